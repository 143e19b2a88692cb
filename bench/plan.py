"""How much to measure: the full plan behind `make bench` and the seconds-long `--quick` plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LEVELS = ("DISABLE_ALL", "BASIC", "EXTENDED", "ALL")


@dataclass(frozen=True)
class Plan:
    """Every knob that bounds the benchmark's time; stored in results.json."""

    name: str
    models: tuple[str, ...] = ("digits", "heavy")
    heavy_size: int = 128  # input side of the heavy model (3 x size x size)
    eval_images: int = 64  # images for the export's equivalence report
    # Model execution, in process
    batch_sizes: tuple[int, ...] = tuple(2**i for i in range(9))  # 1..256
    threads: tuple[int, ...] = (1, 2)
    levels: tuple[str, ...] = LEVELS
    exec_rounds: int = 2  # every configuration in turn, this many times over
    point_seconds: float = 0.25  # timed runs per (config, batch, round) last about this long
    max_run_seconds: float = 1.0  # a point whose single run would take longer is skipped
    # Serving over HTTP
    concurrency: tuple[int, ...] = (1, 16, 64)
    rounds: int = 3  # A B A B: each target measured once per round, in turn
    wrk_seconds: int = 2
    warmup_seconds: int = 1
    serve_models: tuple[str, ...] = ("digits", "heavy")
    litserve_batch: int = 64
    litserve_timeout_s: float = 0.002  # LitServe waits this long to fill a batch
    bnfold_env: dict = field(default_factory=dict)  # BNFOLD_* settings; empty: the defaults
    # The published CNN families through import and verify (bench/families_run.py), 224x224
    families: tuple[str, ...] = ("torch", "keras")
    # Beside Triton, KServe and MLServer on digits, REST and gRPC (bench/peers_run.py)
    peers: tuple[str, ...] = ("triton", "kserve-1", "kserve-2", "mlserver-0", "mlserver-2")
    peer_seconds: int = 3
    # Three rounds, so a ratio's median is a middle round, not the mean of two: one round on a
    # shared host can come out 0.7x or 1.3x the next.
    peer_rounds: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Plan(name="full")

QUICK = Plan(
    name="quick",
    heavy_size=32,
    eval_images=8,
    batch_sizes=(1, 4),
    exec_rounds=1,
    point_seconds=0.03,
    max_run_seconds=0.2,
    concurrency=(1, 16),
    rounds=1,
    wrk_seconds=1,
    warmup_seconds=1,
    serve_models=("digits",),
    peers=(),  # each peer needs its own virtualenv (scripts/install_peers.sh): make bench only
    families=(),  # minutes per family at 224x224: make bench only
)
