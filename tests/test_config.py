"""YAML per-deployment overrides are derived from DeploymentConfig: every deployment
option is accepted (is_driver_deployment included) and checked by it, so the two cannot
drift apart; unknown options and bad values are errors naming the deployment."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

import fleet
from fleet._cli import apply_overrides
from fleet._config import DEPLOYMENT_OPTIONS, DeploymentOverride, FleetConfig
from fleet._deployment import build_plans
from fleet._imports import config_overrides


@fleet.deployment
class Plain:
    def __call__(self) -> str:
        return "plain"


def _config(deployments: str) -> FleetConfig:
    text = f"""
applications:
  - import_path: test_config:app
    deployments:
{deployments}
"""
    return FleetConfig(**yaml.safe_load(text))


def test_is_driver_deployment_override_reaches_the_plan() -> None:
    cfg = _config("      - {name: Plain, is_driver_deployment: true, num_replicas: 3}")
    overrides = {d.name: d.overrides() for d in cfg.applications[0].deployments}
    assert overrides == {"Plain": {"is_driver_deployment": True, "num_replicas": 3}}
    plan = build_plans(apply_overrides(Plain.bind(), overrides), "yaml")[0]
    assert plan.config.is_driver_deployment is True
    assert plan.config.target_replicas() == 1      # one per node on the local backend


def test_every_deployment_option_is_an_override() -> None:
    values = {"num_replicas": 2, "max_ongoing_requests": 5, "max_queued_requests": 10,
              "user_config": {"a": 1}, "autoscaling_config": None,
              "health_check_period_s": 1.0, "health_check_timeout_s": 2.0,
              "graceful_shutdown_timeout_s": 3.0, "startup_timeout_s": 4.0,
              "ray_actor_options": {"num_cpus": 1}, "max_replicas_per_node": 2,
              "is_driver_deployment": True,
              "logging_config": {"log_level": "DEBUG", "encoding": "JSON",
                                 "enable_access_log": True, "logs_dir": None}}
    assert set(values) | {"name"} == DEPLOYMENT_OPTIONS   # a new option must be listed here
    given = {k: v for k, v in values.items() if v is not None}
    assert DeploymentOverride(name="Plain", **given).overrides() == given


def test_unknown_option_and_bad_value_name_the_deployment() -> None:
    with pytest.raises(ValidationError, match="deployment 'Plain': unknown deployment option"):
        _config("      - {name: Plain, num_replica: 2}")
    with pytest.raises(ValidationError, match="deployment 'Plain'.*max_ongoing_requests"):
        _config("      - {name: Plain, max_ongoing_requests: 0}")


@fleet.deployment(ray_actor_options={"num_cpus": 0.5,
                                     "runtime_env": {"env_vars": {"MODE": "own", "B": "b"},
                                                     "pip": ["own-package"]}})
class WithEnv:
    def __call__(self) -> str:
        return "with env"


def test_an_applications_runtime_env_goes_under_each_deployments_own() -> None:
    text = """
applications:
  - import_path: test_config:app
    runtime_env: {env_vars: {MODE: app, A: a}, working_dir: ., pip: [app-package]}
    deployments:
      - {name: Plain, ray_actor_options: {num_cpus: 0.1}}
"""
    app_cfg = FleetConfig(**yaml.safe_load(text)).applications[0]
    assert FleetConfig(**yaml.safe_load(text)).ignored_keys() == []
    graph = WithEnv.bind(Plain.bind())
    overrides = config_overrides(graph, app_cfg)
    # the config's own ray_actor_options for Plain, plus the application's runtime_env
    assert overrides["Plain"]["ray_actor_options"] == {
        "num_cpus": 0.1,
        "runtime_env": {"env_vars": {"MODE": "app", "A": "a"}, "working_dir": ".",
                        "pip": ["app-package"]}}
    # the code's options for WithEnv: its keys win, env_vars merge (its value wins)
    assert overrides["WithEnv"]["ray_actor_options"] == {
        "num_cpus": 0.5,
        "runtime_env": {"env_vars": {"MODE": "own", "A": "a", "B": "b"},
                        "working_dir": ".", "pip": ["own-package"]}}
    plans = build_plans(apply_overrides(graph, overrides), "yaml")
    envs = {p.name: p.config.ray_actor_options["runtime_env"]["env_vars"] for p in plans}
    assert envs == {"WithEnv": {"MODE": "own", "A": "a", "B": "b"},
                    "Plain": {"MODE": "app", "A": "a"}}
    assert config_overrides(graph, FleetConfig(**yaml.safe_load(
        text.replace("    runtime_env: {env_vars: {MODE: app, A: a}, working_dir: ., "
                     "pip: [app-package]}\n", ""))).applications[0]) == {
        "Plain": {"ray_actor_options": {"num_cpus": 0.1}}}
