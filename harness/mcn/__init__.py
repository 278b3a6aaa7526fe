"""MatConvNet semantics in pure NumPy/SciPy (never imports Keras).

Arrays are H x W x C x N; names and options are MatConvNet's (snake_case keywords).
"""

from ._util import McnError
from .bnorm import vl_nnbnorm
from .conv import vl_nnconv, vl_nnconvt
from .loss import vl_nnloss, vl_nnsoftmaxloss
from .matfile import Checkpoint, MatlabObject, load_checkpoint, load_net, read_variables, save_net
from .net import Layer, Net
from .normalize import vl_nnnormalize
from .pointwise import vl_nndropout, vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax
from .pool import vl_nnpool
from .simplenn import Res, vl_simplenn, vl_simplenn_tidy
from .train import TrainOpts, cnn_train, cnn_train_step, prepare_net
from .zoo import seed_net

__all__ = [
    "Checkpoint",
    "Layer",
    "MatlabObject",
    "McnError",
    "Net",
    "Res",
    "TrainOpts",
    "cnn_train",
    "cnn_train_step",
    "prepare_net",
    "read_variables",
    "load_checkpoint",
    "load_net",
    "save_net",
    "seed_net",
    "vl_nnbnorm",
    "vl_nnconv",
    "vl_nnconvt",
    "vl_nndropout",
    "vl_nnloss",
    "vl_nnnormalize",
    "vl_nnpool",
    "vl_nnrelu",
    "vl_nnsigmoid",
    "vl_nnsoftmax",
    "vl_nnsoftmaxloss",
    "vl_simplenn",
    "vl_simplenn_tidy",
]
