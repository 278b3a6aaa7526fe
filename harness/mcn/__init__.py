"""MatConvNet semantics in pure NumPy/SciPy (never imports Keras).

Arrays are H x W x C x N; names and options are MatConvNet's (snake_case keywords).
"""

from harness.mcn.bnorm import vl_nnbnorm
from harness.mcn.conv import vl_nnconv, vl_nnconvt
from harness.mcn.dagnn import DagLayer, DagNet
from harness.mcn.loss import vl_nnloss, vl_nnsoftmaxloss
from harness.mcn.matfile import (
    Checkpoint,
    DagNNNotSupported,
    MatlabObject,
    load_checkpoint,
    load_net,
    read_variables,
    require_simplenn,
    save_net,
)
from harness.mcn.net import Layer, Net
from harness.mcn.normalize import vl_nnnormalize
from harness.mcn.options import McnError
from harness.mcn.pointwise import vl_nndropout, vl_nnrelu, vl_nnsigmoid, vl_nnsoftmax
from harness.mcn.pool import vl_nnpool
from harness.mcn.simplenn import Res, vl_simplenn, vl_simplenn_tidy
from harness.mcn.train import TrainOpts, cnn_train, cnn_train_step, prepare_net
from harness.mcn.train_dag import cnn_train_dag, cnn_train_dag_step
from harness.mcn.zoo import seed_net

__all__ = [
    "Checkpoint",
    "DagLayer",
    "DagNNNotSupported",
    "DagNet",
    "Layer",
    "MatlabObject",
    "McnError",
    "Net",
    "Res",
    "TrainOpts",
    "cnn_train",
    "cnn_train_dag",
    "cnn_train_dag_step",
    "cnn_train_step",
    "prepare_net",
    "read_variables",
    "load_checkpoint",
    "load_net",
    "require_simplenn",
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
