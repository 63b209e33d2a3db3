"""The workflow's side of kvstream, torch-free: what the DAG derives from a config checked by
kvstream.config (names in config order, cells, identical schedules, paths, resources, the experiments' roles).

workflow/rules/common.smk calls `check_config` and builds one `Plan`, which the rule files read. Every
policy goes through `kvstream.schedule.Policy` (checks, defaults, derived W and C): the workflow does no
budget math itself. Identical schedules share their cells (docs/method.md, "Identical schedules")."""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from kvstream.cells import nll_path
from kvstream.codeversion import CELL_ENTRY, RETRIEVAL_ENTRY, SPEED_ENTRY, code_version
from kvstream.config import policy_fields_from_config, recompute_every
from kvstream.schedule import DERIVED_KEYS, Policy, cache_lengths


# ------------------------------------------------------------------------------------------- device
def cuda_at_dag_time(device: str) -> bool:
    """Whether the eval jobs will run on CUDA (they then ask for the resource gpu=1)."""
    if device != "auto":
        return device == "cuda"
    # torch.cuda.is_available() is False without an NVIDIA driver: skip the slow torch import then
    if not (shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists()):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def job_environment(src_dir: str | os.PathLike, python: str = sys.executable, environ=os.environ) -> None:
    """Let a job's `python -m kvstream` find this kvstream with nothing activated: Snakemake's interpreter
    (the .venv) first on PATH; src_dir on PYTHONPATH for `--sdm conda` environments, which lack kvstream.
    Set here, not asked of the user (so no `envvars:`); a SLURM job runs the Snakefile, setting them again."""
    bindir = str(Path(python).parent)  # not resolved: a venv's python is a symlink
    path = environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        environ["PATH"] = os.pathsep.join(p for p in (bindir, path) if p)
    src, pythonpath = str(src_dir), environ.get("PYTHONPATH", "")
    if src not in pythonpath.split(os.pathsep):
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, pythonpath) if p)


DEFAULT_RESOURCES = {  # mem_mb, runtime (minutes) per rule group; config `resources.<group>` overrides
    "fetch_text": {"mem_mb": 4000, "runtime": 60},
    "prepare_model": {"mem_mb": 8000, "runtime": 60},
    "tokenize": {"mem_mb": 4000, "runtime": 30},
    "eval": {"mem_mb": 4000, "runtime": 120},  # 16000 on CUDA (Plan.rule_resources)
    "report": {"mem_mb": 2000, "runtime": 15},
    "paper": {"mem_mb": 2000, "runtime": 15},
}


def _sample_index(sample) -> int:
    return int(str(sample).removeprefix("s"))  # 3 or "s3"


class Plan:
    """What the pipeline runs, from a checked config (`check_config`); common.smk holds one, PLAN."""

    def __init__(self, config: dict, use_cuda: bool | None = None):
        self.config = config
        self.model = config["model"]["name"]
        self.datasets = list(config["datasets"])
        self.experiments = list(config["experiments"])
        self.use_cuda = cuda_at_dag_time(config["model"]["device"]) if use_cuda is None else use_cuda

    # --- experiments ---------------------------------------------------------------------------
    def n_samples(self, dataset: str) -> int:
        return int(self.config["datasets"][dataset]["n_samples"])

    def experiment_dataset(self, name: str) -> str:
        return self.config["experiments"][name]["dataset"]

    def experiment_policies(self, name: str) -> list[str]:
        return list(self.config["experiments"][name]["policies"])

    def experiment_reference(self, name: str) -> str:
        return self.config["experiments"][name]["reference"]

    def experiment_role(self, name: str) -> str:
        return self.config["experiments"][name]["role"]

    def experiment_knob(self, name: str) -> str | None:
        return self.config["experiments"][name].get("knob")

    def experiment_labels(self, name: str) -> dict[str, str]:
        """Display names (config paper.labels) of the experiment's policies that have one."""
        labels = self.config["paper"]["labels"]
        return {p: labels[p] for p in self.experiment_policies(name) if p in labels}

    def dataset_policies(self, dataset: str) -> list[str]:
        """Policies some experiment runs on a dataset, config order."""
        seen = {}
        for e in self.experiments:
            if self.experiment_dataset(e) == dataset:
                seen.update(dict.fromkeys(self.experiment_policies(e)))
        return list(seen)

    # --- policies ------------------------------------------------------------------------------
    @functools.cache
    def policy(self, name: str) -> Policy:
        """The resolved Policy of a config entry (budget_mode cap: W derived from eval.cap)."""
        return Policy.from_dict(policy_fields_from_config(self.config["policies"][name], self.config["eval"]))

    def policy_fields(self, name: str) -> dict:
        """Every field of the resolved policy, as `kvstream eval --policy-json` and Policy.from_dict read them."""
        fields = self.policy(name).as_dict()  # as a cell records it: the scored kinds' fields only for them
        return {k: v for k, v in fields.items() if k not in DERIVED_KEYS}

    def policy_json(self, name: str) -> str:
        """policy_fields as one shell-quoted JSON object."""
        return shlex.quote(json.dumps(self.policy_fields(name)))

    def policy_blocks(self, experiment: str) -> dict[str, dict]:
        """policy -> the policy block its cells must carry (resolved fields and derived values; the aggregate
        checks every cell against it, kvstream.study.verify)."""
        return {p: self.policy(p).as_dict() for p in self.experiment_policies(experiment)}

    def run_facts(self, experiment: str) -> dict:
        """What every cell of an experiment must share: model, dataset, tokens a sample, dtype."""
        ds = self.experiment_dataset(experiment)
        return {"model": self.model, "dataset": ds, "n_tokens": int(self.config["datasets"][ds]["tokens_per_sample"]),
                "dtype": self.config["model"]["dtype"]}

    @functools.cached_property
    def cell_code_version(self) -> str:
        """The code version of the modules that compute a cell (kvstream.codeversion): an eval job's param
        (a change reruns the cells) and its cell's `code_version` label."""
        return code_version(CELL_ENTRY)

    @functools.cached_property
    def speed_code_version(self) -> str:
        """The same for `kvstream speed`: the speed job's param."""
        return code_version(SPEED_ENTRY)

    def recompute_every(self, name: str, dataset: str | None = None) -> int:
        """`kvstream eval --recompute-every`: for recompute the dataset's k (kvstream.config.recompute_every;
        eval.recompute_every without a dataset), 1 (every target) for any other policy."""
        if self.policy(name).type != "recompute":
            return 1
        return recompute_every(self.config, dataset) if dataset else int(self.config["eval"]["recompute_every"])

    @functools.cache
    def _schedule_key(self, dataset: str, name: str) -> tuple:
        """What decides a policy's cells on a dataset: kind, S, budget, cap, positions, cache-length trace."""
        p = self.policy(name)
        n = int(self.config["datasets"][dataset]["tokens_per_sample"])
        if p.scored:  # which tokens go depends on every field: identical only as the same policy
            return (p, tuple(cache_lengths(p, n)))
        # defect switches change positions or rounding, not the trace: never identical to another switch set
        return (p.type, p.n_sink, p.budget, p.cap, p.positions, p.defects, tuple(cache_lengths(p, n)))

    def reused_from(self, dataset: str, policy: str) -> str | None:
        """The earlier policy (config order) whose cells this one reuses; None when it is evaluated itself."""
        key = self._schedule_key(dataset, policy)
        for other in self.dataset_policies(dataset):
            if other == policy:
                return None
            if self._schedule_key(dataset, other) == key:
                return other
        return None

    # --- paths ---------------------------------------------------------------------------------
    def model_dir(self, model: str | None = None) -> str:
        return f"results/models/{model or self.model}"

    def tokens_path(self, dataset: str, sample, model: str | None = None) -> str:
        return f"results/tokens/{model or self.model}/{dataset}/s{_sample_index(sample)}.npy"

    def cell_path(self, dataset: str, policy: str, sample, model: str | None = None) -> str:
        return f"results/cells/{model or self.model}/{dataset}/{policy}/s{_sample_index(sample)}.json"

    def experiment_cells(self, name: str) -> list[str]:
        """Cell JSON paths of an experiment: policy-major, then sample."""
        ds = self.experiment_dataset(name)
        return [self.cell_path(ds, p, i) for p in self.experiment_policies(name) for i in range(self.n_samples(ds))]

    def used_cells(self) -> list[str]:
        """Every cell some experiment needs, each once (a policy shared by experiments is one cell)."""
        return list(dict.fromkeys(c for e in self.experiments for c in self.experiment_cells(e)))

    @staticmethod
    def nll_paths(cells) -> list[str]:
        return [str(nll_path(c)) for c in cells]

    def local_copy(self, dataset: str) -> list[str]:
        """The dataset's local copy (config `path`) when it exists: fetch_text's input, so editing it refetches."""
        path = self.config["datasets"][dataset].get("path")
        return [path] if path and Path(path).exists() else []

    def sample_batches(self, dataset: str) -> list[list[int]]:
        """Sample indices in batches of eval.batch_size: one eval job each."""
        n, size = self.n_samples(dataset), int(self.config["eval"]["batch_size"])
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    # A run's own outputs are keyed by its model (config model.name), like its cells: running another
    # config in the same checkout leaves them alone. paper/ has one owner (kvstream.paper_owner).
    def aggregate_path(self, name: str, ext: str = "csv") -> str:
        return f"results/aggregate/{self.model}/{name}.{ext}"

    def figure_path(self, name: str, ext: str = "pdf") -> str:
        return f"results/figures/{self.model}/{name}.{ext}"

    def speed_path(self, dataset: str, ext: str = "json") -> str:
        return f"results/speed/{self.model}/{dataset}/speed.{ext}"

    # --- speed ---------------------------------------------------------------------------------
    def speed_policies(self, dataset: str) -> list[str]:
        """The policies the speed run times: every evaluated one, and the first that reuses another's cells
        (it runs exactly its source's computation: a probe of timing noise); not those with defect switches
        (their table is about quality)."""
        pols = [p for p in self.dataset_policies(dataset) if not self.policy(p).defects]
        probe = [p for p in pols if self.reused_from(dataset, p)][:1] if self.config["speed"]["noise_probe"] else []
        return [p for p in pols if self.reused_from(dataset, p) is None or p in probe]

    def speed_policies_json(self, dataset: str) -> str:
        """name -> policy fields of the timed policies, shell-quoted JSON."""
        return shlex.quote(json.dumps({p: self.policy_fields(p) for p in self.speed_policies(dataset)}, sort_keys=True))

    def speed_reference(self, dataset: str) -> str:
        return next(self.experiment_reference(e) for e in self.experiments if self.experiment_dataset(e) == dataset)

    @property
    def speed_datasets(self) -> list[str]:
        """Datasets with a speed run: those a pooled experiment uses. A dataset only the long stream uses has
        none: its report reads quality along the stream, and a speed run there would time what the main
        dataset's run times (dense held at cap, caches full: the sample length does not enter)."""
        return [d for d in self.datasets if any(self.experiment_dataset(e) == d for e in self.pooled_experiments)]

    def speed_threads(self) -> int:
        return int(self.config["speed"].get("threads", self.config["eval"]["threads"]))

    def rule_resources(self, group: str, gpu: bool = False) -> dict:
        """mem_mb, runtime (minutes) of a rule group: config `resources.<group>` over DEFAULT_RESOURCES; with
        gpu=True also gpu=1 when the jobs run on CUDA."""
        res = dict(DEFAULT_RESOURCES.get(group, {"mem_mb": 2000, "runtime": 30}))
        if group == "eval" and self.use_cuda:
            res["mem_mb"] = 16000
        res.update(self.config["resources"].get(group) or {})
        if gpu and self.use_cuda:
            res["gpu"] = 1
        return res

    # --- retrieval (config `retrieval`, workflow/rules/retrieval.smk) ----------------------------
    @property
    def retrieval_enabled(self) -> bool:
        return bool(self.config["retrieval"]["enabled"])

    @property
    def retrieval_tasks(self) -> list[str]:
        return list(self.config["retrieval"]["tasks"]) if self.retrieval_enabled else []

    @property
    def retrieval_policies(self) -> list[str]:
        return list(self.config["retrieval"]["policies"]) if self.retrieval_enabled else []

    def retrieval_path(self, task: str, policy: str, model: str | None = None) -> str:
        return f"results/retrieval/{model or self.model}/{task}/{policy}.json"

    def retrieval_results(self) -> list[str]:
        """Every retrieval job's JSON: task-major, then policy (config order)."""
        return [self.retrieval_path(t, p) for t in self.retrieval_tasks for p in self.retrieval_policies]

    def retrieval_documents(self, task: str) -> list[str]:
        """The needle task's filler (the needle dataset's documents.jsonl, rule fetch_text); none for passkey."""
        return [f"results/data/{self.config['retrieval']['needle_dataset']}/documents.jsonl"] if task == "needle" else []

    def retrieval_grid_args(self) -> str:
        """`kvstream retrieval`'s grid arguments, shared by every job (a change reruns them all)."""
        r = self.config["retrieval"]
        args = ["--lengths", *map(str, r["lengths"]), "--depths", *map(str, r["depths"]),
                "--prompts-per-cell", str(r["prompts_per_cell"])]
        return shlex.join(args + (["--max-batch", str(r["max_batch"])] if r.get("max_batch") else []))

    def retrieval_policy_blocks(self) -> dict[str, dict]:
        """policy -> the policy block its results must carry (kvstream.study.retrieval checks them)."""
        return {p: self.policy(p).as_dict() for p in self.retrieval_policies}

    def retrieval_labels(self) -> dict[str, str]:
        """Display names (config paper.labels) of the retrieval policies that have one."""
        labels = self.config["paper"]["labels"]
        return {p: labels[p] for p in self.retrieval_policies if p in labels}

    @functools.cached_property
    def retrieval_code_version(self) -> str:
        """The code version of `kvstream retrieval` (kvstream.codeversion): a retrieval job's param and label."""
        return code_version(RETRIEVAL_ENTRY)

    # --- the paper's roles (config experiments.<name>.role, paper) ------------------------------
    @property
    def main_experiment(self) -> str:
        """The experiment with role main, else the first."""
        return next((e for e in self.experiments if self.experiment_role(e) == "main"), self.experiments[0])

    @property
    def main_dataset(self) -> str:
        return self.experiment_dataset(self.main_experiment)

    @property
    def sweeps(self) -> list[str]:
        return [e for e in self.experiments if self.experiment_role(e) == "sweep"]

    @property
    def defect_experiment(self) -> str | None:
        """The first experiment with role defects (the defect attribution, kvstream.study.defects), or None."""
        return next((e for e in self.experiments if self.experiment_role(e) == "defects"), None)

    @property
    def longstream_experiment(self) -> str | None:
        """The experiment with role longstream (kvstream.study.longstream; one at most, kvstream.config), or None."""
        return next((e for e in self.experiments if self.experiment_role(e) == "longstream"), None)

    @property
    def pooled_experiments(self) -> list[str]:
        """The experiments the common report pools (aggregate, table, macros; report.smk): all but the long
        stream, which has no speed run and a report of its own (workflow/rules/longstream.smk)."""
        return [e for e in self.experiments if e != self.longstream_experiment]

    @property
    def reproduction_experiments(self) -> list[str]:
        """The reproduction table's experiments: the main one and the ablations."""
        return [self.main_experiment] + [e for e in self.experiments if self.experiment_role(e) == "ablation"]

    @property
    def factorial_experiments(self) -> list[str]:
        """Experiments with role factorial (kvstream.study.factorial)."""
        return [e for e in self.experiments if self.experiment_role(e) == "factorial"]

    def main_dataset_aggregates(self) -> list[str]:
        """The aggregate JSONs of every experiment on the main dataset (the attended-length figure's cells)."""
        return [self.aggregate_path(e, "json") for e in self.experiments if self.experiment_dataset(e) == self.main_dataset]

    def trace_cells(self) -> list[str]:
        """First-sample cells of the main dataset's sink policies (the cache-length figure)."""
        ds = self.main_dataset
        return [self.cell_path(ds, p, 0) for p in self.dataset_policies(ds) if self.policy(p).type == "sink"]

    def nll_policies(self) -> list[str]:
        """The per-token NLL figure's policies: the main reference, the first window policy, and the paper's
        baseline (else the first sink policy) on the main dataset."""
        pols = self.dataset_policies(self.main_dataset)
        windows = [p for p in pols if self.policy(p).type == "window"]
        sinks = [p for p in pols if self.policy(p).type == "sink"]
        baseline = self.config["paper"]["baseline"]
        out = [self.experiment_reference(self.main_experiment)] + windows[:1]
        out += [baseline] if baseline in sinks else sinks[:1]
        return [p for p in dict.fromkeys(out) if p in pols]

    def nll_cells(self) -> list[str]:
        ds = self.main_dataset
        return [self.cell_path(ds, p, i) for p in self.nll_policies() for i in range(self.n_samples(ds))]

    def paper_config(self) -> dict:
        """The parts of the config the tables and macros print (a change reruns them)."""
        keys = ("title", "authors", "model", "datasets", "eval", "paper", "experiments")
        return {k: self.config.get(k) for k in keys}
