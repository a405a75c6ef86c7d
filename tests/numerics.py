"""Error measures and per-dtype tolerances, declared once for all tests."""
import torch

# A low-precision tlcore result may have at most ERROR_RATIO times stock PyTorch's own
# error against a float64 reference, plus a floor of a quarter ulp at 1.0 for the dtype
# (stock's error can be near zero on easy inputs, e.g. a layer that is mostly ReLU zeros).
ERROR_RATIO = 2.0
ERROR_FLOOR = {torch.float32: 3e-8, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}
POISON = float("nan")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives inf."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_to_stock(out, stock, ref, dtype, what=""):
    """out's error against ref is within ERROR_RATIO of stock's (see module docstring)."""
    err, stock_err = rel_error(out, ref), rel_error(stock, ref)
    bound = ERROR_RATIO * stock_err + ERROR_FLOOR[dtype]
    assert err <= bound, f"{what}: tlcore error {err:.3g} > {bound:.3g} (stock PyTorch error {stock_err:.3g})"
    return err, stock_err


def opcheck_utils(backend: str, device: torch.device) -> tuple[str, ...]:
    """torch.library.opcheck's checks that can run for this backend and device.

    The AOT-dispatch check traces the op body with fake tensors, and under
    TRITON_INTERPRET=1 wrap_triton returns the interpreted kernel, which cannot run
    on them; on a GPU (and for every other backend) all checks run.
    """
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:3] if backend == "triton" and device.type == "cpu" else utils
