"""Run configuration: YAML validated strictly by pydantic. Errors name the key path.

Engine keys follow vLLM's names (max_num_seqs, max_num_batched_tokens, block_size,
enable_chunked_prefill, enable_prefix_caching, gpu_memory_utilization, tensor_parallel_size, ...).
"""
from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, NonNegativeFloat, NonNegativeInt, ValidationError, model_validator

from .errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- fleet ---------------------------------------------------------------------------------
class OffloadTierConfig(Strict):
    """One KV offload tier below GPU memory (sim/kv_offload.py), per GPU."""
    name: str
    capacity_gib: PositiveFloat = Field(description="KV the tier holds, per GPU")
    bandwidth_gbps: PositiveFloat = Field(description="load bandwidth back to the GPU, GB/s per GPU")


class EngineConfig(Strict):
    max_num_seqs: PositiveInt = 256
    max_num_batched_tokens: PositiveInt = 8192
    block_size: PositiveInt = 16
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: Optional[PositiveInt] = None
    num_gpu_blocks_override: Optional[PositiveInt] = None
    scheduler_overhead_ms: NonNegativeFloat = 0.0
    runtime_overhead_gib: Optional[NonNegativeFloat] = None
    preemption_mode: Literal["recompute", "swap"] = Field(
        "recompute", description="swap: a preempted request's KV goes to CPU memory and comes back (vLLM v0)")
    swap_space_gib: NonNegativeFloat = Field(4.0, description="CPU memory for swapped KV, per GPU (vLLM's default)")
    swap_bandwidth_gbps: PositiveFloat = Field(
        25.0, description="GPU<->CPU copy bandwidth, GB/s per GPU (PCIe 4.0 x16: 32 GB/s raw, ~25 achieved)")
    kv_offload: list[OffloadTierConfig] = Field(default_factory=list,
                                                description="tiers evicted prefix blocks move down (e.g. cpu, ssd)")

    @model_validator(mode="after")
    def _offload_needs_caching(self):
        if self.kv_offload and not self.enable_prefix_caching:
            raise ValueError("kv_offload keeps evicted prefix blocks: it needs enable_prefix_caching: true")
        return self


class RooflinePerf(Strict):
    name: Literal["roofline"] = "roofline"


class LinearPerf(Strict):
    name: Literal["linear"]
    base_s: NonNegativeFloat = 0.0
    per_prefill_token_s: NonNegativeFloat = 0.0
    per_decode_seq_s: NonNegativeFloat = 0.0
    per_context_token_s: NonNegativeFloat = 0.0


class MeasuredPerf(Strict):
    """Execute every batch on a real (random-weight) transformer and use the measured wall time."""
    name: Literal["measured"]
    backend: Literal["numpy", "torch"] = "numpy"
    device: Literal["cpu", "cuda"] = "cpu"
    warmup_steps: NonNegativeInt = Field(3, description="first steps run twice, the second timing is kept")


PerfModel = Annotated[Union[RooflinePerf, LinearPerf, MeasuredPerf], Field(discriminator="name")]


class ReplicaGroup(Strict):
    name: Optional[str] = None
    count: PositiveInt = 1
    gpu: str
    model: str
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    enable_expert_parallel: bool = Field(False, description="MoE: whole experts per TP rank, all-to-all dispatch (vLLM)")
    dtype: Literal["bf16", "fp16", "fp8", "int8", "int4", "fp32"] = Field(
        "bf16", description="weights: fp8 is W8A8; int8 and int4 are weight-only (16-bit activations and KV); "
                            "fp32 for measured CPU devices")
    kv_cache_dtype: Literal["auto", "bf16", "fp16", "fp8", "fp32"] = "auto"
    engine: EngineConfig = EngineConfig()
    perf_model: PerfModel = RooflinePerf()
    role: Literal["mixed", "prefill", "decode"] = Field(
        "mixed", description="prefill/decode disaggregation: prefill replicas compute prompts and first tokens, "
                             "decode replicas the rest (see `disaggregation`)")


class Fleet(Strict):
    replicas: list[ReplicaGroup] = Field(min_length=1)


# --- workload ------------------------------------------------------------------------------
TraceFormat = Literal["azure", "mooncake", "lengths", "servesim", "kv_cache_tester"]


class Poisson(Strict):
    process: Literal["poisson"]
    rate: PositiveFloat


class GammaArrivals(Strict):
    process: Literal["gamma"]
    rate: PositiveFloat
    cv: PositiveFloat = Field(description="coefficient of variation of inter-arrival times (1 = Poisson)")


class ConstantRate(Strict):
    process: Literal["constant"]
    rate: PositiveFloat


class AllAtOnce(Strict):
    process: Literal["all_at_once"]


class ClosedLoop(Strict):
    process: Literal["closed_loop"]
    concurrency: PositiveInt
    think_time_s: NonNegativeFloat = 0.0


class Diurnal(Strict):
    """A day's load, time-scaled: Poisson arrivals whose rate swings between rate x (1 - amplitude) at t=0 and
    rate x (1 + amplitude) at period_s / 2: rate(t) = rate x (1 - amplitude x cos(2 pi t / period_s))."""
    process: Literal["diurnal"]
    rate: PositiveFloat = Field(description="mean rate, requests/s")
    amplitude: float = Field(0.5, ge=0, le=1)
    period_s: PositiveFloat = 86400.0


Arrival = Annotated[Union[Poisson, GammaArrivals, ConstantRate, AllAtOnce, ClosedLoop, Diurnal],
                    Field(discriminator="process")]


class Fixed(Strict):
    dist: Literal["fixed"]
    value: PositiveInt


class Uniform(Strict):
    dist: Literal["uniform"]
    low: PositiveInt
    high: PositiveInt

    @model_validator(mode="after")
    def _order(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class LogNormal(Strict):
    dist: Literal["lognormal"]
    median: PositiveFloat
    sigma: PositiveFloat
    min: PositiveInt = 1
    max: Optional[PositiveInt] = None


LengthDist = Annotated[Union[Fixed, Uniform, LogNormal], Field(discriminator="dist")]


class IndependentLengths(Strict):
    kind: Literal["independent"]
    input: LengthDist
    output: LengthDist


class PairLengths(Strict):
    """(input, output) pairs taken from a trace file: empirical joint distribution."""
    kind: Literal["pairs"]
    path: str
    format: Optional[TraceFormat] = None
    max_total_tokens: Optional[PositiveInt] = None
    order: Literal["sequential", "shuffle", "sample"] = "sequential"


Lengths = Annotated[Union[IndependentLengths, PairLengths], Field(discriminator="kind")]


class Labels(Strict):
    """Who sends a workload part's requests, how they are judged, and what model they ask for."""
    tenant: str = "default"
    slo_class: str = "default"
    model: Optional[str] = Field(None, description="the model its requests ask for: only replicas serving it take them "
                                                   "(none: any replica)")


class TraceWorkload(Labels):
    kind: Literal["trace"]
    path: str
    format: Optional[TraceFormat] = None
    rate_scale: PositiveFloat = Field(1.0, description="2.0 replays the trace twice as fast")
    conversation_interval_s: PositiveFloat = Field(
        60.0, description="kv_cache_tester traces: conversation i starts at i x this (they share no clock)")
    prompt_scale: PositiveFloat = 1.0
    output_scale: PositiveFloat = 1.0
    sample_fraction: float = Field(1.0, gt=0, le=1)
    start_s: NonNegativeFloat = 0.0
    duration_s: Optional[PositiveFloat] = None
    max_requests: Optional[PositiveInt] = None
    max_total_tokens: Optional[PositiveInt] = Field(None, description="shorten prompts so prompt+output fit (as Vidur)")


class SyntheticWorkload(Labels):
    kind: Literal["synthetic"]
    num_requests: Optional[PositiveInt] = None
    duration_s: Optional[PositiveFloat] = None
    start_s: NonNegativeFloat = Field(0.0, description="the first request arrives then (a mix part that starts later)")
    arrival: Arrival
    lengths: Lengths

    @model_validator(mode="after")
    def _bounded(self):
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("set num_requests or duration_s (or both) so the workload ends")
        if self.arrival.process == "all_at_once" and self.num_requests is None:
            raise ValueError("all_at_once arrivals need num_requests")
        if self.arrival.process == "closed_loop" and self.start_s:
            raise ValueError("start_s: closed-loop clients start at t=0")
        return self


class BatchJob(Strict):
    """An offline job: num_requests sent at once at submit_s, wanted within deadline_s of it."""
    name: str
    submit_s: NonNegativeFloat = 0.0
    deadline_s: PositiveFloat = Field(description="seconds after submit_s by which every request should be done")
    num_requests: PositiveInt
    lengths: Lengths
    model: Optional[str] = Field(None, description="the model it runs on (none: any replica)")


class BatchWorkload(Strict):
    """Batch jobs with deadlines (sim/batch_jobs.py): held by the cluster and sent to replicas with spare room
    (policies.batch_jobs), preempted first when online requests need the room; judged by their deadlines."""
    kind: Literal["batch"]
    jobs: list[BatchJob] = Field(min_length=1)
    tenant: str = "batch"

    @model_validator(mode="after")
    def _names(self):
        names = [j.name for j in self.jobs]
        if len(set(names)) < len(names):
            raise ValueError(f"jobs[].name: job names must be distinct (got {names})")
        return self


SingleWorkload = Annotated[Union[TraceWorkload, SyntheticWorkload, BatchWorkload], Field(discriminator="kind")]


class MixWorkload(Strict):
    """Several open-loop workloads (tenants, SLO classes) merged by arrival time."""
    kind: Literal["mix"]
    parts: list[SingleWorkload] = Field(min_length=1)

    @model_validator(mode="after")
    def _open_loop(self):
        for i, p in enumerate(self.parts):
            if p.kind == "synthetic" and p.arrival.process == "closed_loop":
                raise ValueError(f"parts[{i}]: closed-loop clients cannot be mixed (give each part arrival times)")
        return self


class SessionsWorkload(Labels):
    """Agentic sessions replayed closed-loop from kv-cache-tester conversations (traces/sessions.py): sessions
    start by the arrival process; each next turn is sent its think time after the previous response."""
    kind: Literal["sessions"]
    path: str = Field(description="a kv-cache-tester conversation file or folder (bundled:kv_cache_tester_sample)")
    arrival: Arrival = Field(description="when sessions start (an open-loop process)")
    num_sessions: Optional[PositiveInt] = Field(None, description="the first n conversations (default: all)")
    think_time_scale: NonNegativeFloat = Field(1.0, description="0 sends each turn as soon as the last one ends")
    retention: Literal["evict", "keep", "offload"] = Field(
        "evict", description="KV between turns: evict (freed, cached until evicted), keep (held on its replica "
                             "until the session's next turn arrives; needs prefix caching), offload (evicted blocks go to the "
                             "engine.kv_offload tiers, which every replica must have)")

    @model_validator(mode="after")
    def _open(self):
        if self.arrival.process == "closed_loop":
            raise ValueError("arrival: sessions start by an open-loop process (poisson, constant, ...); each "
                             "session is itself a closed loop")
        return self


Workload = Annotated[Union[TraceWorkload, SyntheticWorkload, BatchWorkload, MixWorkload, SessionsWorkload],
                     Field(discriminator="kind")]


# --- policies, SLOs, cost, output ------------------------------------------------------------

class SimpleBatching(Strict):
    name: Literal["continuous", "static", "sarathi", "orca", "prefill_first", "edf"] = "continuous"


class PriorityBatching(Strict):
    name: Literal["priority"]
    priorities: dict[str, int] = Field(default_factory=dict,
                                       description="SLO class -> priority, lower first (unlisted classes: 0)")


class DynamicBatchingConfig(Strict):
    name: Literal["dynamic"]
    timeout_ms: PositiveFloat = Field(50.0, description="launch a batch not yet full once its oldest request waited this")


class FairBatching(Strict):
    name: Literal["fair"]
    weights: dict[str, PositiveFloat] = Field(default_factory=dict, description="tenant -> share weight (unlisted: 1)")


class SJFBatching(Strict):
    name: Literal["sjf"]
    predictor: Literal["oracle", "noisy"] = "oracle"
    noise_sigma: NonNegativeFloat = Field(0.5, description="noisy: lognormal error, standard deviation in log space")


Batching = Annotated[Union[SimpleBatching, PriorityBatching, SJFBatching, DynamicBatchingConfig, FairBatching],
                     Field(discriminator="name")]


class SimpleRouting(Strict):
    name: Literal["round_robin", "random", "least_outstanding", "least_kv", "power_of_two",
                  "capacity_weighted"] = "least_outstanding"


class CheapestFirstRouting(Strict):
    name: Literal["cheapest_first"]
    max_outstanding: PositiveInt = Field(32, description="a replica with this many requests takes no more while "
                                                         "another has room")


class PrefixAwareRouting(Strict):
    name: Literal["prefix_aware"]
    cache_threshold: float = Field(0.5, ge=0, le=1, description="least fraction of the prompt cached to follow the cache")
    balance_abs_threshold: NonNegativeInt = Field(32, description="imbalanced when max - min outstanding exceeds this ...")
    balance_rel_threshold: float = Field(1.5, ge=1, description="... and max exceeds this times min")


class SessionAffinityRouting(Strict):
    name: Literal["session_affinity"]
    virtual_nodes: PositiveInt = 160


class TenantPoolsRouting(Strict):
    name: Literal["tenant_pools"]
    pools: dict[str, list[NonNegativeInt]] = Field(description="tenant -> the replica indices that serve it")


class CanaryRouting(Strict):
    name: Literal["canary"]
    group: str = Field(description="the replica group (fleet.replicas[].name) that gets the canary traffic")
    fraction: float = Field(0.1, gt=0, lt=1, description="share of requests sent to it")


Routing = Annotated[Union[SimpleRouting, PrefixAwareRouting, SessionAffinityRouting, TenantPoolsRouting,
                          CheapestFirstRouting, CanaryRouting],
                    Field(discriminator="name")]


class AcceptAllAdmission(Strict):
    name: Literal["accept_all"] = "accept_all"


class MaxQueueAdmission(Strict):
    name: Literal["max_queue"]
    max_waiting: PositiveInt


class Bucket(Strict):
    tokens_per_s: PositiveFloat = Field(description="refill rate, in request tokens (prompt + output) per second")
    burst_tokens: PositiveFloat = Field(description="bucket size: the largest burst admitted at once")


class TokenBucketAdmission(Strict):
    name: Literal["token_bucket"]
    tenants: dict[str, Bucket] = Field(default_factory=dict, description="a bucket per tenant")
    default: Optional[Bucket] = Field(None, description="the bucket of each tenant not listed (none: unlimited)")


class SLOSheddingAdmission(Strict):
    name: Literal["slo_shedding"]
    slack: PositiveFloat = Field(1.0, description="reject when predicted TTFT > slack x the class's TTFT SLO")


Admission = Annotated[Union[AcceptAllAdmission, MaxQueueAdmission, TokenBucketAdmission, SLOSheddingAdmission],
                      Field(discriminator="name")]


class Eviction(Strict):
    name: Literal["lru", "fifo", "lfu", "gdsf"] = "lru"


class ResponseCacheConfig(Strict):
    enabled: bool = False
    capacity: PositiveInt = Field(10000, description="answers kept (least recently used dropped)")


class BatchJobsPolicy(Strict):
    """How batch jobs fill idle capacity (sim/batch_jobs.py)."""
    fill_to: Optional[PositiveInt] = Field(
        None, description="a replica takes batch requests while it has fewer than this many requests in flight, "
                          "online ones included (default: its engine.max_num_seqs): lower keeps online latency "
                          "closer to an idle fleet's, higher finishes jobs sooner")
    order: Literal["edf", "fifo"] = Field("edf", description="which job's requests go first: earliest deadline, "
                                                             "or earliest submitted")


class Policies(Strict):
    batching: Batching = SimpleBatching()
    routing: Routing = SimpleRouting()
    admission: Admission = AcceptAllAdmission()
    eviction: Eviction = Eviction()
    response_cache: ResponseCacheConfig = ResponseCacheConfig()
    batch_jobs: BatchJobsPolicy = BatchJobsPolicy()


class SLOClass(Strict):
    ttft_ms: Optional[PositiveFloat] = None
    tpot_ms: Optional[PositiveFloat] = None
    e2e_ms: Optional[PositiveFloat] = None
    priority: Optional[int] = Field(None, description="importance, lower first: what the report's priority-inversion "
                                                       "check holds the run to (else the priority policy's map)")
    attainment_target: Optional[float] = Field(None, gt=0, le=1, description="share of requests that must meet the "
                                               "targets: the report's verdict is met, missed or uncertain (its "
                                               "interval straddles this)")


class SLO(Strict):
    classes: dict[str, SLOClass] = {"default": SLOClass()}


class Cost(Strict):
    usd_per_gpu_hour: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="price overrides by catalog GPU name (else the catalog's price)")


class Output(Strict):
    sample_interval_s: PositiveFloat = 1.0
    plots: bool = True
    ci: bool = Field(True, description="95% confidence intervals (sectioning, sim/intervals.py) next to latency "
                                       "statistics and SLO attainment, and SLO verdicts")
    model_error_runs: int = Field(8, ge=0, description="with ci: runs of `servesim run` repeated with the roofline "
                                  "op times perturbed by the reference kernels' residuals, for the step-time model's "
                                  "share of the intervals (sim/uncertainty.py); 0: workload randomness only")


class SimOptions(Strict):
    max_sim_time_s: Optional[PositiveFloat] = None
    check_invariants: bool = False
    fast_decode: bool = Field(True, description="advance runs of pure-decode steps without rescheduling "
                                                "(identical results; false runs every step through the policy)")


class ColdStart(Strict):
    load_gbps: PositiveFloat = Field(2.0, description="weights read per GPU, GB/s (local NVMe ~2-7, network storage less)")
    engine_startup_s: NonNegativeFloat = Field(30.0, description="engine start after the weights: process, CUDA "
                                                                 "graphs, warm-up")


FIXED_REPLICA_ROUTERS = ("tenant_pools", "canary")   # name replicas by index: not for pools that change or split


class Disaggregation(Strict):
    """The link that carries KV caches from prefill to decode replicas (per GPU: each GPU sends its shard)."""
    bandwidth_gbps: PositiveFloat = Field(description="GB/s per GPU: NVLink 4 ~450 one way, InfiniBand NDR "
                                                      "400 Gb/s = 50, PCIe 5.0 x16 ~50")
    latency_us: NonNegativeFloat = Field(10.0, description="fixed cost of a transfer")
    layerwise: bool = Field(False, description="layer-by-layer transfer overlapping the prefill: only the last "
                                               "layer's share is left when the prompt is done")


class Autoscaling(Strict):
    """Scale one replica group between min_replicas and its count. Every interval_s the metric of the active
    replicas is compared with the target: concurrency (outstanding requests per replica, as Knative's KPA),
    queue (waiting requests per replica) or slo_attainment (of the requests finished in the last interval)."""
    group: NonNegativeInt = Field(0, description="index into fleet.replicas; its count is the maximum")
    min_replicas: PositiveInt = 1
    initial_replicas: Optional[PositiveInt] = Field(None, description="active at t=0 (default min_replicas)")
    metric: Literal["concurrency", "queue", "slo_attainment"] = "concurrency"
    target: PositiveFloat
    tolerance: float = Field(0.1, ge=0, lt=1, description="no change while metric / target is within 1 +- this "
                                                          "(Kubernetes HPA's default)")
    interval_s: PositiveFloat = 10.0
    scale_down_cooldown_s: NonNegativeFloat = 60.0
    warm_pool: NonNegativeInt = Field(0, description="standby replicas kept loaded (paid): they start at once")
    cold_start: ColdStart = ColdStart()


class FaultEvent(Strict):
    """One fault at a fixed time. crash: a replica dies (its requests' KV is lost) and restarts after the
    restart delay; node_loss: every replica with a GPU on the node, likewise; straggler: a replica's steps take
    slowdown x longer for duration_s; network: the prefill -> decode KV link runs at bandwidth_factor x its
    bandwidth for duration_s."""
    kind: Literal["crash", "node_loss", "straggler", "network"]
    at_s: NonNegativeFloat
    replica: Optional[NonNegativeInt] = Field(None, description="crash, straggler: the replica's index")
    node: Optional[NonNegativeInt] = Field(None, description="node_loss: the node's index (faults.gpus_per_node)")
    duration_s: Optional[PositiveFloat] = Field(None, description="straggler, network: how long it lasts")
    slowdown: float = Field(2.0, gt=1, description="straggler: step time factor")
    bandwidth_factor: float = Field(0.1, gt=0, lt=1, description="network: share of the link's bandwidth left")

    @model_validator(mode="after")
    def _fields(self):
        need = {"crash": ("replica",), "node_loss": ("node",), "straggler": ("replica", "duration_s"),
                "network": ("duration_s",)}[self.kind]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} fault needs {' and '.join(missing)}")
        return self


class RandomFaults(Strict):
    """Faults as a Poisson process: for each replica (crash, straggler) or node (node_loss), at rate_per_hour."""
    kind: Literal["crash", "node_loss", "straggler"]
    rate_per_hour: PositiveFloat = Field(description="per replica (crash, straggler) or per node (node_loss)")
    duration_s: PositiveFloat = Field(60.0, description="straggler: how long each lasts")
    slowdown: float = Field(2.0, gt=1, description="straggler: step time factor")


class Faults(Strict):
    """Fault injection (sim/faults.py)."""
    events: list[FaultEvent] = Field(default_factory=list)
    random: list[RandomFaults] = Field(default_factory=list)
    gpus_per_node: PositiveInt = Field(8, description="replicas are packed onto nodes in fleet order")
    restart: ColdStart = Field(ColdStart(), description="a crashed replica is back after its cold start: weights "
                                                        "per GPU / load_gbps + engine_startup_s")
    in_flight: Literal["fail", "timeout", "reroute"] = Field(
        "fail", description="what the requests on a crashed replica see: fail (an error at once: the client may "
                            "retry), timeout (nothing until client.timeout_s), reroute (the gateway resends them "
                            "at once)")


class Client(Strict):
    """How clients behave when a request fails or takes too long."""
    timeout_s: Optional[PositiveFloat] = Field(None, description="give up on an attempt not finished this long after "
                                                                 "it was sent (none: wait forever)")
    max_retries: NonNegativeInt = Field(0, description="resend a failed or timed-out request up to this many times")
    backoff_s: NonNegativeFloat = Field(1.0, description="wait before the first retry; doubled for each next one")


class Config(Strict):
    name: str = "run"
    seed: int = 0
    fleet: Fleet
    workload: Workload
    policies: Policies = Policies()
    slo: SLO = SLO()
    cost: Cost = Cost()
    output: Output = Output()
    sim: SimOptions = SimOptions()
    autoscaling: Optional[Autoscaling] = None
    disaggregation: Optional[Disaggregation] = None
    faults: Optional[Faults] = None
    client: Client = Client()

    @model_validator(mode="after")
    def _faults(self):
        f = self.faults
        if f is None:
            return self
        n = sum(g.count for g in self.fleet.replicas)
        for i, e in enumerate(f.events):
            if e.replica is not None and e.replica >= n:
                raise ValueError(f"faults.events[{i}].replica: {e.replica} is not a replica index (0..{n - 1})")
            if e.kind == "network" and self.disaggregation is None:
                raise ValueError(f"faults.events[{i}]: a network fault slows the prefill -> decode KV link; this "
                                 "fleet has no disaggregation")
        if f.in_flight == "timeout" and self.client.timeout_s is None:
            raise ValueError("faults.in_flight timeout: requests on a crashed replica wait for the client's timeout; "
                             "set client.timeout_s")
        if self.autoscaling is not None and (f.events or f.random):
            raise ValueError("faults: not yet supported together with autoscaling")
        return self

    @model_validator(mode="after")
    def _disaggregation(self):
        roles = [g.role for g in self.fleet.replicas]
        split = any(r != "mixed" for r in roles)
        if split and ("mixed" in roles or "prefill" not in roles or "decode" not in roles):
            raise ValueError(f"fleet.replicas[].role: a disaggregated fleet needs prefill and decode groups and no "
                             f"mixed ones (got {roles})")
        if split and self.disaggregation is None:
            raise ValueError("disaggregation: prefill and decode roles need the KV link (bandwidth_gbps, latency_us)")
        if not split and self.disaggregation is not None:
            raise ValueError("disaggregation: set fleet.replicas[].role to prefill and decode for some groups")
        if split and self.policies.routing.name in FIXED_REPLICA_ROUTERS:
            raise ValueError(f"disaggregation: policies.routing {self.policies.routing.name} names fixed replicas; "
                             "use a router that picks within each pool")
        if split and self.autoscaling is not None:
            raise ValueError("autoscaling: not yet supported with prefill/decode disaggregation")
        return self

    @model_validator(mode="after")
    def _retention(self):
        w = self.workload
        if w.kind != "sessions":
            return self
        for i, g in enumerate(self.fleet.replicas):
            if w.retention == "keep" and not g.engine.enable_prefix_caching:
                raise ValueError(f"workload.retention keep: fleet.replicas[{i}].engine.enable_prefix_caching must be "
                                 "true (kept blocks are found again by their prefix hashes)")
            if w.retention == "offload" and not g.engine.kv_offload:
                raise ValueError(f"workload.retention offload: fleet.replicas[{i}].engine.kv_offload has no tiers "
                                 "to offload to")
        return self

    @model_validator(mode="after")
    def _autoscaling(self):
        a = self.autoscaling
        if a is None:
            return self
        if a.group >= len(self.fleet.replicas):
            raise ValueError(f"autoscaling.group: {a.group} is not an index into fleet.replicas "
                             f"(0..{len(self.fleet.replicas) - 1})")
        count = self.fleet.replicas[a.group].count
        init = a.initial_replicas or a.min_replicas
        if not a.min_replicas <= init <= count or init + a.warm_pool > count:
            raise ValueError(f"autoscaling: need min_replicas <= initial_replicas <= fleet.replicas[{a.group}].count "
                             f"({count}, the maximum) and initial_replicas + warm_pool <= it "
                             f"(got min {a.min_replicas}, initial {init}, warm pool {a.warm_pool})")
        if a.metric == "slo_attainment" and a.target > 1:
            raise ValueError("autoscaling.target: an SLO attainment target is a fraction in (0, 1]")
        if self.policies.routing.name in FIXED_REPLICA_ROUTERS:
            raise ValueError(f"autoscaling: policies.routing {self.policies.routing.name} names fixed replicas; use "
                             "a router that picks among the active ones")
        return self

    @model_validator(mode="after")
    def _models_named(self):
        named = any(p.model is not None if p.kind != "batch" else any(j.model is not None for j in p.jobs)
                    for _, p in workload_parts(self.workload))
        if named and self.policies.routing.name in FIXED_REPLICA_ROUTERS:
            raise ValueError(f"policies.routing: {self.policies.routing.name} names fixed replicas; requests that "
                             "name a model need a router that picks among that model's replicas")
        return self

    @model_validator(mode="after")
    def _classes_exist(self):
        w = self.workload
        for where, part in workload_parts(w):
            if part.kind == "batch":              # judged by their deadlines, not by an SLO class
                continue
            if part.slo_class not in self.slo.classes:
                raise ValueError(f"{where}.slo_class {part.slo_class!r} is not one of slo.classes "
                                 f"({', '.join(self.slo.classes)})")
        return self


def workload_parts(w) -> list:
    """(key path, part) of each open-loop part of a workload: itself, or a mix's parts."""
    return [("workload", w)] if w.kind != "mix" else [(f"workload.parts[{i}]", p) for i, p in enumerate(w.parts)]


# --- loading ---------------------------------------------------------------------------------
_TAGS = {"trace", "synthetic", "mix", "poisson", "gamma", "constant", "all_at_once", "closed_loop", "fixed", "uniform",
         "lognormal", "independent", "pairs", "roofline", "linear", "measured", "accept_all", "max_queue", "token_bucket", "slo_shedding",
         "continuous", "static", "dynamic", "sarathi", "orca", "prefill_first", "edf", "priority", "sjf", "fair",
         "round_robin", "random", "least_outstanding", "least_kv", "power_of_two", "prefix_aware", "session_affinity",
         "tenant_pools", "capacity_weighted", "cheapest_first", "canary", "diurnal", "concurrency",
         "queue", "slo_attainment", "sessions", "evict", "keep", "offload", "batch", "crash",
         "node_loss", "straggler", "network"}


def _path(loc) -> str:
    """The key path of a pydantic error location, without the union tags pydantic inserts after a union
    field (never first: the top level is no union, and a sweep's own `random` key is)."""
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (k and part in _TAGS) or "[" in str(part) or "function-" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _allowed(loc) -> list[str]:
    model: type | None = Config
    for part in loc[:-1]:
        if model is None or isinstance(part, int) or part in _TAGS:
            if part in _TAGS and model is not None:
                model = _pick_tag(model, part)
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _model_of(field.annotation) if field else None
    return sorted(getattr(model, "model_fields", {})) if isinstance(model, type) else []


def _model_of(tp):
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if origin is Annotated:
        return _model_of(typing.get_args(tp)[0])
    if origin in (list, dict, Union) or origin is not None:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        models = [m for m in (_model_of(a) for a in args) if m is not None]
        if len(models) == 1:
            return models[0]
        return tuple(models) or None
    return None


def _pick_tag(model, tag):
    for m in (model if isinstance(model, tuple) else (model,)):
        for f in getattr(m, "model_fields", {}).values():
            if typing.get_origin(f.annotation) is Literal and tag in typing.get_args(f.annotation):
                return m
    return model


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in e.errors():
        loc = err["loc"]
        where = _path(loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed(loc)
            hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
            lines.append(f"  {where}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"  {where}: {msg}{shown}")
    return "\n".join(lines)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw config dict; list items by index."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    key, value = assignment.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML: {e}") from None
    set_path(raw, key.strip(), parsed, what="--set ")


def set_path(raw: dict, key: str, value, what: str = "") -> None:
    """raw[a][b][c] = value for key "a.b.c", creating sections on the way; list items by index."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{what}{key!r}: empty segment in key path")
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what}{key}: {'.'.join(parts[:i]) or 'root'} is a list of {len(node)}; "
                                  f"{part!r} is not a valid index")
            part = int(part)
            if last:
                node[part] = value
            else:
                node = node[part]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{what}{key}: {'.'.join(parts[:i])} is a value, not a section")


def load_raw(path: str | Path) -> dict:
    """A config file's raw mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (fleet, workload, ...)")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> tuple[Config, Path]:
    p = Path(path)
    raw = load_raw(p)
    for o in overrides:
        apply_override(raw, o)
    return parse_config(raw, str(path)), p.parent


def parse_spec(model, raw: dict, path, what: str):
    """A sweep or plan file validated by its pydantic model, with errors worded as for configs."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path)).replace("invalid config", f"invalid {what}", 1)) from None


def load_base(base, spec_path: Path) -> tuple[dict, Path]:
    """A sweep's or plan's base config: a file relative to the spec file, or an inline mapping (or none);
    returns its raw mapping and the folder its relative paths resolve from."""
    if isinstance(base, str):
        p = (Path(spec_path).parent / base).resolve()
        return load_raw(p), p.parent
    return copy.deepcopy(base or {}), Path(spec_path).parent.resolve()


def parse_config(raw: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
