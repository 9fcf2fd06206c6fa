import pytest

from servesim.sim.config import apply_override, parse_config
from servesim.sim.errors import ConfigError
from conftest import BASE
import copy


def test_set_overrides_nested_keys_and_list_items():
    raw = copy.deepcopy(BASE)
    apply_override(raw, "fleet.replicas.0.count=8")
    apply_override(raw, "fleet.replicas.0.engine.enable_chunked_prefill=false")
    apply_override(raw, "workload.arrival.rate=2.5")
    cfg = parse_config(raw)
    g = cfg.fleet.replicas[0]
    assert g.count == 8 and g.engine.enable_chunked_prefill is False and cfg.workload.arrival.rate == 2.5


@pytest.mark.parametrize("bad,msg", [("fleet.replicas.3.count=1", "not a valid index"),
                                     ("seed.x=1", "seed is a value, not a section"),
                                     ("novalue", "expected KEY.PATH=VALUE")])
def test_bad_overrides(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_override(copy.deepcopy(BASE), bad)


def test_slo_class_must_exist():
    raw = copy.deepcopy(BASE)
    raw["workload"]["slo_class"] = "gold"
    with pytest.raises(ConfigError, match="'gold' is not one of slo.classes"):
        parse_config(raw)


def test_config_schema_lists_vllm_engine_keys():
    from servesim.sim.config import Config
    schema = Config.model_json_schema()
    eng = schema["$defs"]["EngineConfig"]["properties"]
    for k in ("max_num_seqs", "max_num_batched_tokens", "block_size", "enable_chunked_prefill",
              "enable_prefix_caching", "gpu_memory_utilization"):
        assert k in eng


def test_policies_listing_matches_the_config_choices():
    import subprocess
    import sys
    import typing
    from servesim.policies import registry
    from servesim.sim import config
    out = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "policies"], capture_output=True, text=True,
                         check=True).stdout
    for table in (registry.BATCHING, registry.ROUTING, registry.ADMISSION, registry.EVICTION):
        for name in table:
            assert f"  {name} " in out
    # every registered name is selectable in the config, and every config choice is registered
    def names(union):          # Annotated[Union[A, B, ...], Field(discriminator="name")]
        members = typing.get_args(typing.get_args(union)[0])
        return {n for m in members for n in typing.get_args(m.model_fields["name"].annotation)}
    assert names(config.Batching) == set(registry.BATCHING)
    assert names(config.Routing) == set(registry.ROUTING)
    assert names(config.Admission) == set(registry.ADMISSION)
    assert set(typing.get_args(config.Eviction.model_fields["name"].annotation)) == set(registry.EVICTION)
