"""Build a simulation from a validated config, run it, and return the raw result."""
from __future__ import annotations

import dataclasses
import gc
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from servesim.hwmodels.catalog import GIB, get_gpu, get_model
from servesim.hwmodels.linear import LinearModel
from servesim.hwmodels.memory import engine_constants, plan_memory
from servesim.hwmodels.roofline import RooflineModel
from servesim.hwmodels.step_time import BatchShape
from servesim.policies import registry
from servesim.policies.response_cache import ResponseCache
from servesim.traces.workload import Workload, build_workload

from .config import Config
from .cluster import Cluster
from .errors import ConfigError, ServesimError
from .kv_cache import BlockPool
from .kv_offload import OffloadStore, Tier
from .metrics import Metrics
from .replica import Replica


@dataclass
class ReplicaInfo:
    index: int
    group: str
    gpu: str
    model: str
    tp: int
    pp: int
    num_gpus: int
    usd_per_gpu_hour: float
    peak_flops: float    # whole replica (all its GPUs), for MFU
    peak_bw: float       # whole replica, for MBU
    num_blocks: int
    block_size: int
    memory: str


@dataclass
class RunResult:
    config: Config
    metrics: Metrics
    replicas: list[ReplicaInfo]
    rejections: dict
    workload: Workload
    sim_end: float
    events: int
    wall_s: float
    peak_rss_mb: float
    pools: list = field(default_factory=list)
    step_models: list = field(default_factory=list)   # per replica (the measured backend keeps a step log)
    regret: dict | None = None                         # routing regret, computed on request (sim/decisions.py)
    autoscaling: dict | None = None                    # the autoscaler's events and timeline (sim/autoscaler.py)
    session_logs: list | None = None                   # agentic sessions (traces/sessions.py)
    paid_s: dict | None = None                         # scaled replicas: seconds paid (others: the whole run)
    faults: object = None                              # the FaultInjector (sim/faults.py): its events, up/down times


def _price(cfg: Config, gpu) -> float:
    if gpu.name in cfg.cost.usd_per_gpu_hour:
        return cfg.cost.usd_per_gpu_hour[gpu.name]
    if gpu.usd_per_hour is None:
        raise ConfigError(f"gpu {gpu.name} has no price in the catalog; set cost.usd_per_gpu_hour.{gpu.name}")
    return gpu.usd_per_hour


def _where(loc: str, fn, *a, **k):
    try:
        return fn(*a, **k)
    except ServesimError as e:
        raise type(e)(f"{loc}: {e}") from None


def rng_streams(seed: int) -> list:
    """The run's generators: workload, router, policies, decode router, faults. spawn(k)[:j] are spawn(j)'s
    children, so each stream added later left the earlier ones (and every result) as they were."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]


def build(cfg: Config, base_dir: Path | None, env, metrics, measured_reference: bool = False,
          until: float = math.inf, route_override: tuple[int, int] | None = None, step_error: dict | None = None):
    """The cluster, replicas, their infos and the workload of a config. until: stop time (the earlier of it and
    sim.max_sim_time_s); route_override: (decision index, replica) forced (routing regret, sim/decisions.py);
    step_error: {gpu: {op class: factor}}, roofline op times multiplied by them (hwmodels/model_error.py)."""
    wl_rng, route_rng, policy_rng, decode_rng, fault_rng = rng_streams(cfg.seed)
    batching_cls = registry.BATCHING[cfg.policies.batching.name][0]
    batching_params = cfg.policies.batching.model_dump(exclude={"name"})

    def scheduler(e):
        """A policy that needs more than its parameters (SLOs, the run's generator) builds itself."""
        if hasattr(batching_cls, "from_config"):
            return batching_cls.from_config(e, batching_params, cfg, policy_rng)
        return batching_cls(e.max_num_seqs, e.max_num_batched_tokens, e.enable_chunked_prefill, **batching_params)
    replicas, infos = [], []
    group_of, plans = [], []                 # each replica's group index; each group's memory plan
    pol = cfg.policies
    eviction = registry.EVICTION[pol.eviction.name][0]()
    for gi, g in enumerate(cfg.fleet.replicas):
        loc = f"fleet.replicas[{gi}]"
        gpu = _where(f"{loc}.gpu", get_gpu, g.gpu)
        model = _where(f"{loc}.model", get_model, g.model)
        e = g.engine
        tp, pp = g.tensor_parallel_size, g.pipeline_parallel_size
        if model.num_attention_heads % tp:
            raise ConfigError(f"{loc}.tensor_parallel_size: {tp} does not divide the {model.num_attention_heads} "
                              f"attention heads of {model.name}")
        if pp > model.num_layers:
            raise ConfigError(f"{loc}.pipeline_parallel_size: {pp} exceeds the {model.num_layers} layers of {model.name}")
        if g.enable_expert_parallel and (not model.is_moe or model.num_experts % tp):
            raise ConfigError(f"{loc}.enable_expert_parallel: needs a MoE model whose experts divide over the "
                              f"{tp} TP ranks ({model.name} has {model.num_experts or 'no'} experts)")
        max_len = e.max_model_len or model.max_position_embeddings
        if max_len > model.max_position_embeddings:
            raise ConfigError(f"{loc}.engine.max_model_len: {max_len} exceeds the model's "
                              f"max_position_embeddings {model.max_position_embeddings}")
        kv_dtype = g.kv_cache_dtype if g.kv_cache_dtype != "auto" else (
            "bf16" if g.dtype in engine_constants()["weight_only_dtypes"] else g.dtype)
        plan = _where(loc, plan_memory, model, gpu, tp=tp, pp=pp, dtype=g.dtype, kv_dtype=kv_dtype,
                      block_size=e.block_size, gpu_memory_utilization=e.gpu_memory_utilization,
                      max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs,
                      runtime_overhead_gib=e.runtime_overhead_gib)
        blocks = e.num_gpu_blocks_override or plan.num_blocks
        plans.append(plan)
        pm = g.perf_model

        def roofline(error=None):
            return RooflineModel(model, gpu, tp=tp, pp=pp, dtype=g.dtype, kv_dtype=kv_dtype,
                                 overhead_s=e.scheduler_overhead_ms / 1000, ep=g.enable_expert_parallel, error=error)

        def measured():       # one per replica: it holds that replica's KV cache
            from servesim.hwmodels.measured import MeasuredModel
            if tp > 1 or pp > 1:
                raise ConfigError(f"{loc}.perf_model: the measured backend runs one device (tensor and pipeline "
                                  "parallel sizes 1)")
            ref = _where(loc, roofline) if measured_reference else None
            return _where(f"{loc}.perf_model", MeasuredModel, model, pm.backend, pm.device, cfg.seed,
                          pm.warmup_steps, ref)

        if pm.name == "linear":
            step_model = LinearModel(pm.base_s, pm.per_prefill_token_s, pm.per_decode_seq_s, pm.per_context_token_s)
        elif pm.name == "roofline":
            step_model = roofline((step_error or {}).get(gpu.name))
        price = _price(cfg, gpu)
        n_gpus = tp * pp
        for _ in range(g.count):
            i = len(replicas)
            pool = BlockPool(blocks, e.block_size, enable_prefix_caching=e.enable_prefix_caching, eviction=eviction,
                             offload=offload_store(e, plan))
            sched = scheduler(e)
            name = g.name or f"{gpu.name}/{model.name}"
            if pm.name == "measured":
                step_model = measured()
            replicas.append(Replica(env, i, sched, pool, step_model, metrics, max_model_len=max_len,
                                    check_invariants=cfg.sim.check_invariants, pp=pp,
                                    fast_decode=cfg.sim.fast_decode, stop_time=min(cfg.sim.max_sim_time_s or math.inf, until),
                                    swap=swap_space(e, plan)))
            rep = replicas[-1]
            # a measured backend runs real kernels for every step it prices: rank it by its roofline instead; a
            # model-error run ranks by the unperturbed model, as the operator's estimate would
            rep.capacity = decode_capacity(roofline() if pm.name != "linear" else step_model, e.max_num_seqs)
            rep.usd_per_hour = n_gpus * price
            rep.group = name
            rep.model_name = model.name
            rep.fill_to = pol.batch_jobs.fill_to or e.max_num_seqs
            rep.kv_bytes_per_token, rep.num_layers = plan.kv_bytes_per_token, model.num_layers
            group_of.append(gi)
            infos.append(ReplicaInfo(i, name, gpu.name, model.name, tp, pp, n_gpus, price,
                                     n_gpus * gpu.peak_flops(g.dtype), n_gpus * gpu.mem_bw, blocks, e.block_size,
                                     plan.describe()))
    router = registry.ROUTING[pol.routing.name][0](route_rng, **pol.routing.model_dump(exclude={"name"}))
    if hasattr(router, "validate"):          # a router that names replicas checks them against the fleet
        router.validate(len(replicas))
    if hasattr(router, "validate_groups"):   # ... or names replica groups
        router.validate_groups([r.group for r in replicas])
    if route_override is not None:
        from .decisions import ForcedRouter
        router = ForcedRouter(router, *route_override)
    if metrics.decisions is not None:
        for i, r in enumerate(replicas):
            r.pool.on_evict = lambda pool, h, key, i=i: metrics.decisions.evict(i, pool, h, key)
    adm_cls = registry.ADMISSION[pol.admission.name][0]
    adm_cfg = pol.admission.model_dump(exclude={"name"})
    admission = adm_cls.from_config(adm_cfg, cfg) if hasattr(adm_cls, "from_config") else adm_cls(**adm_cfg)
    rc = pol.response_cache
    cluster = Cluster(env, replicas, router, admission, metrics,
                      ResponseCache(rc.capacity) if rc.enabled else None)
    if cfg.disaggregation is not None:
        role = [cfg.fleet.replicas[g].role for g in group_of]
        decode_router = registry.ROUTING[pol.routing.name][0](decode_rng, **pol.routing.model_dump(exclude={"name"}))
        cluster.disaggregate([r for r, x in zip(replicas, role) if x == "prefill"],
                             [r for r, x in zip(replicas, role) if x == "decode"], decode_router, cfg.disaggregation)
    a = cfg.autoscaling
    if a is not None:
        from .autoscaler import Autoscaler
        from .report import meets_slo
        cold = plans[a.group].weight_bytes / (a.cold_start.load_gbps * 1e9) + a.cold_start.engine_startup_s
        scaler = Autoscaler(env, cluster, [r for r, g in zip(replicas, group_of) if g == a.group], a, cold)
        scaler.meets = lambda req: meets_slo(req, cfg.slo.classes)
    c, f = cfg.client, cfg.faults
    if c.timeout_s is not None or c.max_retries or f is not None:
        from .faults import Clients
        cluster.clients = Clients(env, cluster, c)
    if f is not None:
        from .faults import FaultInjector, node_map
        cluster.crash_policy = f.in_flight
        restart = [plans[g].weight_bytes / (f.restart.load_gbps * 1e9) + f.restart.engine_startup_s for g in group_of]
        cluster.faults = FaultInjector(env, cluster, f, restart, node_map([i.num_gpus for i in infos], f.gpus_per_node),
                                       fault_rng)
    workload = build_workload(cfg.workload, wl_rng, base_dir)
    _name_models(cfg, workload, cluster)
    if workload.job_specs is not None:
        from .batch_jobs import BatchQueue
        cluster.batch = BatchQueue(cluster, workload.job_specs, pol.batch_jobs.order)
    return cluster, replicas, infos, workload


def _name_models(cfg: Config, w: Workload, cluster) -> None:
    """Requests naming a model get its catalog name; each named model must be served by some replica (by some
    prefill replica, disaggregated)."""
    from .config import workload_parts
    served = {r.model_name for r in cluster.routable}
    canon = {}
    named = [(f"{where}.model", part.model) for where, part in workload_parts(cfg.workload) if part.kind != "batch"]
    named += [(f"{where}.jobs[{k}].model", j.model) for where, part in workload_parts(cfg.workload)
              if part.kind == "batch" for k, j in enumerate(part.jobs)]
    for where, m in named:
        if m is None:
            continue
        name = _where(where, get_model, m).name
        if name not in served:
            raise ConfigError(f"{where}: no replica serves {name} (fleet.replicas[].model: "
                              f"{', '.join(sorted(served))})")
        canon[m] = name
    if not canon:
        return
    if w.model is not None:
        w.model = canon[w.model]
    if w.models is not None:
        w.models = [canon[m] if m is not None else None for m in w.models]
    if w.job_specs is not None:
        w.job_specs = [s if s.model is None else dataclasses.replace(s, model=canon[s.model]) for s in w.job_specs]


CAPACITY_BATCH, CAPACITY_CONTEXT = 64, 1024


def decode_capacity(model, max_num_seqs: int) -> float:
    """Output tokens/s of a replica decoding a batch of min(64, max_num_seqs) sequences of 1,024 cached tokens:
    one number that ranks replicas of different GPUs, parallelism and models for capability-aware routing."""
    b = min(CAPACITY_BATCH, max_num_seqs)
    return b / model.step_time(BatchShape(decode_cached=[CAPACITY_CONTEXT] * b, num_sampled=b)).seconds


def swap_space(e, plan):
    """(CPU swap space in KV blocks, seconds to copy one block) for preemption_mode swap; None otherwise."""
    if e.preemption_mode != "swap":
        return None
    block_bytes = plan.kv_bytes_per_token * e.block_size         # per GPU
    return int(e.swap_space_gib * GIB // block_bytes), block_bytes / (e.swap_bandwidth_gbps * 1e9)


def offload_store(e, plan):
    """The replica's KV offload tiers, sized in blocks of this model's per-GPU KV bytes (None without)."""
    if not e.kv_offload:
        return None
    block_bytes = plan.kv_bytes_per_token * e.block_size
    return OffloadStore([Tier(t.name, int(t.capacity_gib * GIB // block_bytes), t.bandwidth_gbps * 1e9)
                         for t in e.kv_offload], block_bytes)


def simulate(cfg: Config, base_dir: Path | None = None, progress=None, measured_reference: bool = False,
             trace_steps: bool = False, trace_decisions: bool = False, until: float = math.inf,
             route_override: tuple[int, int] | None = None, step_error: dict | None = None) -> RunResult:
    """Run to completion (or sim.max_sim_time_s). progress(sim_time, requests_done, total) is called every 16k events.
    measured_reference: measured replicas also price each step with the roofline model (servesim validate).
    trace_steps: record every iteration in metrics.trace (sim/trace_events.py); trace_decisions: every routing,
    admission, preemption and eviction decision in metrics.decisions (sim/decisions.py). until: stop there too;
    route_override: (decision index, replica) forced; step_error: roofline op times scaled per GPU and class
    (a model-error run, sim/uncertainty.py)."""
    t0 = time.perf_counter()
    env = simpy.Environment()
    metrics = Metrics(sum(g.count for g in cfg.fleet.replicas), cfg.output.sample_interval_s)
    if trace_steps:
        from .trace_events import StepTrace
        metrics.trace = StepTrace()
    if trace_decisions:
        from .decisions import DecisionLog
        metrics.decisions = DecisionLog()
    cluster, replicas, infos, workload = build(cfg, base_dir, env, metrics, measured_reference, until, route_override,
                                               step_error)
    if workload.arrival is not None:
        env.process(cluster.open_loop(workload))
        total = len(workload)
    elif workload.conversations is not None:
        env.process(cluster.sessions(workload))
        total = workload.max_requests
    else:
        cluster.closed_loop(workload)
        total = workload.max_requests
    limit = min(cfg.sim.max_sim_time_s or math.inf, until)
    step, peek = env.step, env.peek
    events = 0
    inf = math.inf
    collecting = gc.isenabled()      # the cyclic collector would walk every live request again and again (a million
    gc.disable()                     # in a big run) for the few cycles the loop leaves: collected when it ends
    try:
        while True:
            t = peek()                   # an empty queue peeks as +inf
            if t == inf or t >= limit:   # as SimPy's run(until=...): nothing at or after the stop time
                break
            step()
            events += 1
            if progress is not None and not events & 0x3FFF:
                progress(env.now, metrics.done, total)
    finally:
        if collecting:
            gc.enable()
    if progress is not None:
        progress(env.now, metrics.done, total)
    metrics.itl.flush()
    unfinished = any(r.outcome == "" for r in metrics.requests)
    # a run cut by max_sim_time_s lasts until the cut (GPUs are paid for it); otherwise to the last finish
    sim_end = env.now if unfinished else max((r.finish for r in metrics.requests if r.finish == r.finish),
                                             default=env.now)
    if unfinished and limit != math.inf:
        sim_end = limit
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    res = RunResult(cfg, metrics, infos, dict(cluster.rejections), workload, sim_end, events,
                    time.perf_counter() - t0, rss, [r.pool for r in replicas], [r.model for r in replicas])
    res.session_logs = cluster.session_logs
    res.faults = cluster.faults
    if cluster.autoscaler is not None:
        res.autoscaling = cluster.autoscaler.report(sim_end)
        res.paid_s = dict(cluster.autoscaler.paid_s)
    return res
