"""Registry registration, lookups and helpful misses; build_trainer errors."""
import pytest

from locoop.config import get_cfg_default
from locoop.engine import DATASET_REGISTRY, TRAINER_REGISTRY, Registry, RegistryError, build_trainer


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


def test_miss_names_the_registry_the_closest_and_all_names():
    reg = Registry("TRAINER", kind="trainer")
    for name in ("LoCoOp", "ZeroshotCLIP", "SeTARFT"):
        reg.register(type(name, (), {}))
    with pytest.raises(RegistryError) as e:
        reg.get("LoCoOpp")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert str(e.value) == ("unknown trainer 'LoCoOpp' (TRAINER registry); did you mean 'LoCoOp'? "
                            "valid trainers: LoCoOp, ZeroshotCLIP, SeTARFT")
    with pytest.raises(KeyError) as e:  # wrong case: not accepted, but named
        reg.get("locoop")
    assert "did you mean 'LoCoOp'?" in str(e.value)
    with pytest.raises(KeyError) as e:  # empty registry says why it may be empty
        Registry("EMPTY").get("x")
    assert "imported" in str(e.value)


def test_normalised_names_and_aliases():
    reg = Registry("SCORE", kind="OOD score", plural="scores", normalize=lambda s: s.lower().replace("-", ""),
                   aliases={"maxsoftmax": "MCM"})
    reg.register(object(), name="MCM")
    spec = reg.register(object(), name="GL-MCM")
    assert reg.get("glmcm") is spec and reg.canonical_name("gl-mcm") == "GL-MCM"
    assert reg.get("MaxSoftmax") is reg.get("MCM") and "max-softmax" in reg and "msp" not in reg
    with pytest.raises(RegistryError, match=r"already registered in the SCORE registry \(as 'GL-MCM'\)"):
        reg.register(object(), name="glmcm")
    assert reg.list(lambda n, _: "-" in n) == ["GL-MCM"]
    assert reg.unregister("mcm") is not None and reg.registered_names() == ["GL-MCM"]


def _unknown_lookups():
    """One unknown-name lookup per registry of the code base, through its public get_* function."""
    from clip.configs import get_config
    from locoop.data import build_dataset
    from locoop.engine.registry import get_trainer_class
    from locoop.ood.scores import get_score
    from locoop.setar.searchers import get_searcher

    cfg = get_cfg_default()
    cfg.DATASET.NAME = "ImageNett"
    return [
        ("TRAINER", "LoCoOP", "LoCoOp", lambda: get_trainer_class("LoCoOP")),
        ("DATASET", "ImageNett", "ImageNet", lambda: build_dataset(cfg)),
        ("SCORE", "GL-MCN", "GL-MCM", lambda: get_score("GL-MCN")),
        ("SEARCHER", "visual_txt", "visual_text", lambda: get_searcher("visual_txt")),
        ("CLIP_CONFIG", "tiny-vit-h3", "tiny-vit-h2", lambda: get_config("tiny-vit-h3")),
    ]


@pytest.mark.parametrize("registry, name, closest, lookup", _unknown_lookups(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_registry_fails_the_same_way(registry, name, closest, lookup):
    with pytest.raises(RegistryError) as e:
        lookup()
    msg = str(e.value)
    assert msg.startswith("unknown ") and f"{name!r} ({registry} registry); did you mean {closest!r}? valid " in msg
    assert closest in msg.split("valid ", 1)[1]  # the full list follows


def test_one_registry_class_holds_every_kind_of_entry():
    from clip.configs import CONFIGS
    from locoop.data import list_datasets
    from locoop.engine.evaluator import EVALUATOR_REGISTRY
    from locoop.engine.registry import list_trainers
    from locoop.ood.scores import SCORE_REGISTRY
    from locoop.setar.searchers import SEARCHERS

    registries = (TRAINER_REGISTRY, DATASET_REGISTRY, EVALUATOR_REGISTRY, SCORE_REGISTRY, SEARCHERS, CONFIGS)
    assert all(type(r) is Registry for r in registries)
    assert {"LoCoOp", "CoOp", "ZeroshotCLIP", "SeTARFT", "LoRA"} <= set(list_trainers())
    assert list_datasets() == ["ImageNet", "OpenOODImageNet", "PascalVOC"] and "Classification" in EVALUATOR_REGISTRY
    assert "GL-MCM" in SCORE_REGISTRY and "visual_text" in SEARCHERS and "tiny-vit" in CONFIGS


def test_build_trainer_errors():
    cfg = get_cfg_default()
    with pytest.raises(ValueError) as e:
        build_trainer(cfg)
    assert "TRAINER.NAME is empty" in str(e.value)
    cfg.TRAINER.NAME = "NoSuchTrainerXYZ"
    with pytest.raises(KeyError) as e:
        build_trainer(cfg)
    assert "unknown trainer 'NoSuchTrainerXYZ'" in str(e.value)
    assert all(n in str(e.value) for n in ("LoCoOp", "CoOp", "ZeroshotCLIP", "SeTARFT", "LoRA"))
