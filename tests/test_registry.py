"""Registry registration, lookups and helpful misses; build_trainer errors."""
import pytest

from locoop.config import get_cfg_default
from locoop.engine import DATASET_REGISTRY, TRAINER_REGISTRY, Registry, build_trainer


def test_register_as_decorator_alias_and_direct_call():
    reg = Registry("THING")

    @reg.register()
    class Alpha:
        pass

    @reg.register("BetaAlias")
    class Beta:
        pass

    def gamma():
        return 3

    assert reg.register(gamma) is gamma
    reg.register(gamma, name="gamma2")
    assert reg.get("Alpha") is Alpha and reg.get("BetaAlias") is Beta and reg.get("gamma2")() == 3
    assert reg.registered_names() == ["Alpha", "BetaAlias", "gamma", "gamma2"]
    assert "Alpha" in reg and "Beta" not in reg and len(reg) == 4


def test_duplicate_name_is_refused_unless_forced():
    reg = Registry("THING")

    @reg.register()
    class A:
        pass

    reg.register(A)  # the same object again is harmless (e.g. a module imported twice)

    class B:
        pass

    with pytest.raises(KeyError) as e:
        reg.register(B, name="A")
    assert "already registered" in str(e.value)
    reg.register(B, name="A", force=True)
    assert reg.get("A") is B


def test_miss_lists_registered_names_and_closest():
    reg = Registry("TRAINER")
    for name in ("LoCoOp", "ZeroshotCLIP", "SeTARFT"):
        reg.register(type(name, (), {}))
    with pytest.raises(KeyError) as e:
        reg.get("LoCoOpp")
    msg = str(e.value)
    assert "'LoCoOpp' is not registered in the TRAINER registry" in msg
    assert "Did you mean 'LoCoOp'?" in msg
    assert "['LoCoOp', 'ZeroshotCLIP', 'SeTARFT']" in msg
    with pytest.raises(KeyError) as e:  # wrong case
        reg.get("locoop")
    assert "Did you mean 'LoCoOp'?" in str(e.value)
    with pytest.raises(KeyError) as e:  # empty registry says why it may be empty
        Registry("EMPTY").get("x")
    assert "imported" in str(e.value)


def test_global_registries_exist():
    assert isinstance(TRAINER_REGISTRY, Registry) and isinstance(DATASET_REGISTRY, Registry)


def test_build_trainer_errors():
    cfg = get_cfg_default()
    with pytest.raises(ValueError) as e:
        build_trainer(cfg)
    assert "TRAINER.NAME is empty" in str(e.value)
    cfg.TRAINER.NAME = "NoSuchTrainerXYZ"
    with pytest.raises(KeyError) as e:
        build_trainer(cfg)
    assert "NoSuchTrainerXYZ" in str(e.value) and "Registered" in str(e.value)
