"""tlcore: fused conv+BN+ReLU, INT8 inference and stochastic-rounding optimizers for ResNet-family CNNs.

    fast = tlcore.fuse(model)                       # conv+BN(+residual)+ReLU as single Triton kernels
    qmodel = tlcore.quantize(model, calibration)    # calibrated INT8 inference (GPU and CPU kernels)
    tlcore.sqnr_report(model, qmodel, batches)      # per-block SQNR of the int8 model, in dB
    opt = tlcore.optim.AdamW(params, seed=0)        # 16-bit params and states, stochastic rounding
"""
from tlcore import ops, optim
from tlcore.backend import use_backend
from tlcore.fuse import fuse
from tlcore.quantize import quantize
from tlcore.sqnr_report import sqnr_report

__version__ = "0.1.0"
__all__ = ["fuse", "ops", "optim", "quantize", "sqnr_report", "use_backend", "__version__"]
