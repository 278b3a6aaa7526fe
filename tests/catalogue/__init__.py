"""Independent catalogue of hand-written Keras ports of the golden MatConvNet networks.

Nothing in this package imports or reads ``harness``: the ports are written the way users
write them and are checked directly against MatConvNet's stored outputs.
"""
