"""Accelerators: dense tensor-core peaks, memory and a default rental price, each figure with its source.

Peaks are dense (no 2:4 structured sparsity; vendors' headline figures for NVIDIA parts are sparse, twice these)
and for training-grade accumulation (FP32). GeForce cards run FP32-accumulate at half their FP16-accumulate rate,
so their rows are half the gaming-oriented headline numbers. Memory is as marketed; HBM and GDDR capacities are
binary, so 80 GB means 80 GiB of bytes. Prices are rough mid-2025 on-demand rentals per GPU-hour from specialised
clouds; they vary two- to three-fold between providers and over time, so every command takes `--price`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError

T = 1e12


@dataclass(frozen=True)
class GPU:
    name: str
    bf16: float  # dense BF16 tensor FLOP/s, FP32 accumulate
    fp8: float | None  # dense FP8 (E4M3) tensor FLOP/s, FP32 accumulate; None: no FP8 tensor cores
    memory_gib: float  # device memory as marketed (GiB)
    bandwidth: float  # memory bandwidth, bytes/s
    price: float  # default $ per GPU-hour
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def peak(self, precision: str = "bf16") -> float:
        """Dense FLOP/s at `precision` (bf16 or fp8)."""
        if precision not in ("bf16", "fp8"):
            raise ConfigError(f"precision {precision!r}: must be bf16 or fp8")
        value = self.bf16 if precision == "bf16" else self.fp8
        if value is None:
            raise ConfigError(f"{self.name} has no {precision.upper()} tensor cores; use --precision bf16")
        return value

    def to_dict(self) -> dict:
        return {**asdict(self), "memory_bytes": self.memory_bytes}


_HOPPER = ("NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 and FP8 3,958 TFLOPS with sparsity, "
           "80 GB HBM3 at 3.35 TB/s")
GPUS: dict[str, GPU] = {
    # The export variant of H100 SXM: the same SMs and clocks (so the same tensor peaks), NVLink cut to 400 GB/s.
    # DeepSeek-V3 was trained on 2,048 of them, and its report prices them at $2 per GPU-hour (arXiv 2412.19437,
    # section 1 and Table 1).
    "h800": GPU("H800 SXM", 989.5 * T, 1979 * T, 80, 3.35e12, 2.00,
                f"{_HOPPER}; H800 = H100 compute with 400 GB/s NVLink; $2/h: DeepSeek-V3 report, Table 1"),
    "h100": GPU("H100 SXM", 989.5 * T, 1979 * T, 80, 3.35e12, 2.50, _HOPPER),
    "h200": GPU("H200 SXM", 989.5 * T, 1979 * T, 141, 4.8e12, 3.50,
                "NVIDIA H200 Tensor Core GPU datasheet: H100's compute (BF16 1,979 / FP8 3,958 TFLOPS sparse), "
                "141 GB HBM3e at 4.8 TB/s"),
    "b200": GPU("B200 (HGX)", 2250 * T, 4500 * T, 180, 7.7e12, 5.50,
                "NVIDIA HGX B200 specifications, per GPU: FP16/BF16 4.5 and FP8 9 PFLOPS with sparsity, "
                "180 GB HBM3e at 7.7 TB/s"),
    "a100": GPU("A100 SXM 80GB", 312 * T, None, 80, 2.039e12, 1.50,
                "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense, no FP8, 80 GB HBM2e at 2,039 GB/s"),
    "mi300x": GPU("MI300X", 1307.4 * T, 2614.9 * T, 192, 5.3e12, 2.50,
                  "AMD Instinct MI300X data sheet: BF16 1,307.4 and FP8 2,614.9 TFLOPS dense, 192 GB HBM3 at 5.3 TB/s"),
    "rtx4090": GPU("RTX 4090", 165.2 * T, 330.3 * T, 24, 1.008e12, 0.60,
                   "NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: BF16 165.2 and FP8 330.3 TFLOPS "
                   "dense with FP32 accumulate, 24 GB GDDR6X at 1,008 GB/s"),
    "rtx5090": GPU("RTX 5090", 209.5 * T, 419 * T, 32, 1.792e12, 0.90,
                   "NVIDIA RTX Blackwell architecture whitepaper, GeForce RTX 5090: FP16/BF16 209.5 and FP8 419 "
                   "TFLOPS dense with FP32 accumulate (838 TFLOPS FP16 headline is sparse, FP16 accumulate), "
                   "32 GB GDDR7 at 1,792 GB/s"),
}


def get_gpu(name: str) -> GPU:
    key = name.lower().replace("-", "").replace(" ", "")
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]
