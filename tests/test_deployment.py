"""Declaring deployments: decorator forms, options and their validation (no processes)."""

from __future__ import annotations

import pytest

import fleet
from fleet._deployment import build_plans


def test_decorator_with_and_without_arguments():
    @fleet.deployment
    class A:
        pass

    @fleet.deployment(num_replicas=3, max_ongoing_requests=7)
    class B:
        pass

    @fleet.deployment
    def f(x):
        return x

    assert isinstance(A, fleet.Deployment) and A.name == "A"
    assert B.config.num_replicas == 3 and B.config.max_ongoing_requests == 7
    assert f.name == "f"
    assert fleet.deployment(f, name="g").name == "g"


def test_defaults_are_documented_values():
    @fleet.deployment
    class A:
        pass

    cfg = A.config
    assert (cfg.num_replicas, cfg.max_ongoing_requests, cfg.max_queued_requests) == (1, 100, -1)
    assert (cfg.health_check_period_s, cfg.health_check_timeout_s) == (10.0, 30.0)
    assert cfg.graceful_shutdown_timeout_s == 20.0
    assert cfg.user_config is None and cfg.autoscaling_config is None
    assert cfg.is_driver_deployment is False and cfg.ray_actor_options is None


def test_options_returns_a_copy():
    @fleet.deployment(num_replicas=2)
    class A:
        pass

    b = A.options(name="B", num_replicas=4, user_config={"k": 1})
    assert (A.name, A.config.num_replicas) == ("A", 2)
    assert (b.name, b.config.num_replicas, b.config.user_config) == ("B", 4, {"k": 1})
    assert b.func_or_class is A.func_or_class


def test_unknown_option_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="num_replica"):
        fleet.deployment(num_replica=2)(lambda: None)

    @fleet.deployment
    class A:
        pass

    with pytest.raises(TypeError, match="max_ongoing"):
        A.options(max_ongoing=3)


@pytest.mark.parametrize("option,value", [
    ("num_replicas", "two"), ("num_replicas", -1), ("max_ongoing_requests", 0),
    ("health_check_period_s", "soon"), ("autoscaling_config", {"min_replicas": 5,
                                                               "max_replicas": 2}),
])
def test_bad_option_values_are_value_errors_naming_the_option(option, value):
    @fleet.deployment
    class A:
        pass

    with pytest.raises(ValueError, match=option):
        A.options(**{option: value})


def test_num_replicas_auto_uses_autoscaling_defaults():
    @fleet.deployment(num_replicas="auto")
    class A:
        pass

    assert A.config.autoscaling_config is not None
    assert A.config.autoscaling_config.min_replicas == 1


def test_calling_a_deployment_directly_explains_what_to_do():
    @fleet.deployment
    class A:
        pass

    with pytest.raises(TypeError, match=r"A.bind\(...\)"):
        A()


def test_build_plans_names_duplicates_and_puts_ingress_first():
    @fleet.deployment
    class Leaf:
        def __init__(self, n):
            self.n = n

    @fleet.deployment
    class Root:
        def __init__(self, *leaves):
            pass

    plans = build_plans(Root.bind(Leaf.bind(1), Leaf.bind(2)), "app")
    assert [p.name for p in plans] == ["Root", "Leaf", "Leaf_1"]
    assert plans[0].ingress and not plans[1].ingress
    same = build_plans(Root.bind(Leaf.bind(1), Leaf.bind(2)), "app")
    assert [p.version for p in plans] == [p.version for p in same]
    changed = build_plans(Root.bind(Leaf.bind(1), Leaf.bind(3)), "app")
    assert changed[1].version == plans[1].version
    assert changed[2].version != plans[2].version


def test_live_options_do_not_change_the_version():
    @fleet.deployment
    class A:
        pass

    v1 = build_plans(A.bind(), "x")[0].version
    v2 = build_plans(A.options(num_replicas=3, user_config={"a": 1}).bind(), "x")[0].version
    v3 = build_plans(A.options(max_ongoing_requests=3).bind(), "x")[0].version
    assert v1 == v2 != v3


def test_run_rejects_what_is_not_an_application():
    @fleet.deployment
    class A:
        pass

    with pytest.raises(TypeError, match="expects an Application"):
        fleet.run(A)  # type: ignore[arg-type]
