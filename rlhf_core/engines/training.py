"""DeepSpeed set-up: distributed init (gloo on CPU, nccl on GPUs), the DeepSpeed config built from a
stage's settings, the optimizer and LR schedule, and ``deepspeed.initialize``."""

from __future__ import annotations

import copy
import importlib
import os
import socket
from typing import Any, Iterable

import torch

from rlhf_core.config import DeepSpeedConfig, OptimizerConfig
from rlhf_core.stages.context import DistInfo


class EngineSetupError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sanitize_cuda_arch_list() -> None:
    """DeepSpeed's JIT op builder parses TORCH_CUDA_ARCH_LIST as numbers and fails on Hopper's '9.0a'
    (``invalid literal for int()``); '9.0' builds the same kernels for it."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs and "a" in archs:
        fixed = " ".join(a.rstrip("a") if a[:1].isdigit() else a for a in archs.replace(";", " ").split())
        os.environ["TORCH_CUDA_ARCH_LIST"] = fixed


def init_distributed(device: str, master_addr: str = "127.0.0.1", master_port: int | None = None,
                     cpu_threads: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed for this process.

    Under torchrun or the DeepSpeed launcher the environment carries RANK/WORLD_SIZE/...; a lone process
    gets a world of one (otherwise ``deepspeed.initialize`` would go looking for MPI).
    """
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sanitize_cuda_arch_list()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port or free_port()))
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    if os.environ.get("RLHF_DETERMINISTIC") == "1":
        # Deterministic CUDA kernels (cuBLAS workspace, no atomics in backward) so that a resumed run can be
        # compared byte for byte with an uninterrupted one; kernels without a deterministic version warn.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Flash, memory-efficient and cuDNN attention accumulate their backward with atomics: math only.
        for backend in ("flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
    import deepspeed

    if device == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce kernel for the CPU backend on first use
        # (~35 s on 2 cores). It only speeds up multi-process CPU runs, which are tests here; gloo
        # does the same reduction without a compiler.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EngineSetupError("resources.device is cuda but no CUDA device is visible; use resources.device=cpu")
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", auto_mpi_discovery=False)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size(), dev)


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_ds_config(ds: DeepSpeedConfig, opt: OptimizerConfig, micro_batch: int, grad_accum: int,
                    world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine; ``ds.extra`` is merged last, so users can set any key."""
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "stage3_gather_16bit_weights_on_model_save": True,
        "stage3_param_persistence_threshold": 1e4,
        "stage3_max_live_parameters": 3e7,
        "stage3_prefetch_bucket_size": 3e7,
        "memory_efficient_linear": False,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        # bf16 has no loss scale, yet DeepSpeed's default still checks every gradient partition for inf/NaN
        # with its own kernels and a host sync each (about 100 ms of CPU per step on one GPU, measured);
        # ``check_finite_grad_norm`` below does the same job with the one norm DeepSpeed computes anyway.
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if opt.impl == "deepspeed":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                                                           "weight_decay": opt.weight_decay}}
    return deep_merge(config, ds.extra)


_NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on biases and norms (DeepSpeed-Chat's grouping)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(n in name.lower() for n in _NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_scheduler(opt_cfg: OptimizerConfig, total_steps: int):
    """A callable DeepSpeed applies to whichever optimizer it ends up with."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[opt_cfg.scheduler]

    def make(optimizer):
        return get_scheduler(name, optimizer, num_warmup_steps=opt_cfg.warmup_steps,
                             num_training_steps=max(total_steps, 1))

    return make


def initialize(model: torch.nn.Module, config: dict[str, Any], opt: OptimizerConfig, total_steps: int):
    """``deepspeed.initialize`` with this project's optimizer, schedule and checkpoint format.

    ``config`` comes from ``build_ds_config``; build the model with the same config (``models.*(...,
    partition_with=config)``) so that under ZeRO-3 it is partitioned as it loads.
    """
    import deepspeed

    from rlhf_core.storage.checkpoint import SafeCheckpointEngine

    groups = param_groups(model, opt.weight_decay)
    if not groups:
        raise EngineSetupError("the model has no trainable parameters (is everything frozen?)")
    optimizer = None
    if opt.impl == "torch":
        # fused: one kernel per step over DeepSpeed's flat fp32 partition instead of ~10 elementwise passes
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=build_scheduler(opt, total_steps),
        config=config,
    )
    engine.checkpoint_engine = SafeCheckpointEngine()
    return engine


def frozen_config(precision: str, offload: bool, micro_batch: int, world_size: int) -> dict[str, Any]:
    """A ZeRO-3 config for a frozen model (reference, reward) beside a ZeRO-3 trainee: no optimizer, the
    weights partitioned across ranks and gathered layer by layer in the forward (DeepSpeed-Chat's eval config);
    ``offload`` keeps the partitions in host memory."""
    return build_ds_config(DeepSpeedConfig(zero_stage=3, precision=precision, offload_params=offload),
                           OptimizerConfig(), micro_batch, 1, world_size)


def frozen_engine(model: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
    """Wrap a frozen model in a DeepSpeed ZeRO-3 engine without an optimizer; returns the module, whose
    forward gathers its weights through the engine's hooks. Every rank must run the same forwards."""
    import deepspeed

    model.requires_grad_(False).eval()
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine.module


class NonFiniteGradient(FloatingPointError):
    """Training diverged: a gradient norm that is not finite. The stage stops before saving anything."""


def check_finite_grad_norm(engine, what: str) -> None:
    """Raise if the last step's global gradient norm was inf/NaN (bf16 runs skip DeepSpeed's own check).
    One host sync per optimizer step; fp16 keeps DeepSpeed's loss-scaling overflow handling."""
    if not engine.bfloat16_enabled():
        return
    norm = engine.get_global_grad_norm()
    if norm is None:
        return
    value = float(norm)
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteGradient(f"{what}: gradient norm is {value}; training diverged (lower the learning rate, "
                                "or use fp32/fp16 with loss scaling)")


def trainable_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def iter_full_parameters(module: torch.nn.Module, zero3: bool, want: bool):
    """Yield ``(names, tensor)`` for every parameter of ``module`` with its full value.

    Under ZeRO-3 each parameter is gathered (a collective every rank must join) and released again, so
    peak memory stays at one full parameter; ``want`` says whether this rank uses the value (others get
    None). Tied parameters come once, with all their names (``remove_duplicate=False``).
    """
    groups: dict[int, tuple[list[str], torch.nn.Parameter]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), ([], param))[0].append(name)
    for names, param in groups.values():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield names, (param.data if want else None)
        else:
            yield names, (param.data if want else None)
