"""Driver-side refusals (erc_verl.seams.preflight): one line, `erc-verl: error: ...`, exit 2, before Ray starts.

In-process tests compose our real Hydra config; the integration tests run the real command lines
(`python -m erc_verl.main_ppo`, `bash recipe/...`) and time them. Data files are made in tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
from verl.workers.config import FSDPActorConfig

from erc_verl.seams import preflight as P
from erc_verl.algorithm.config import ERCFSDPActorConfig, erc_actor_keys
from erc_verl.seams.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ACTOR = "actor_rollout_ref.actor"
HF_ID = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
REFUSAL_SECONDS = 60  # generous for 2 busy cores; measured refusals take ~5-20 s, most of it importing verl


def data_files(tmp_path: Path) -> tuple[Path, Path]:
    train, val = tmp_path / "train.parquet", tmp_path / "val.parquet"
    train.touch()
    val.touch()
    return train, val


def valid_overrides(tmp_path: Path) -> list[str]:
    """A config that passes every driver check (no GPU needed until Ray)."""
    train, val = data_files(tmp_path)
    return [
        f"data.train_files={train}",
        f"data.val_files={val}",
        f"actor_rollout_ref.model.path={HF_ID}",
        "actor_rollout_ref.rollout.name=vllm",
        f"{ACTOR}.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "algorithm.adv_estimator=grpo",
    ]


def refusal(overrides) -> str:
    with pytest.raises(ConfigError) as error:
        P.check_config(P.compose(overrides))
    return str(error.value)


def expected_erc_keys() -> list[str]:
    base = {f.name for f in dataclasses.fields(FSDPActorConfig)}
    keys = [f.name for f in dataclasses.fields(ERCFSDPActorConfig) if f.name not in base]
    assert {"entropy_mask_low", "entropy_mask_high", "erc_base_loss_mode", "erc_diagnostics"} <= set(keys)
    return keys


# ------------------------------------------------------------------------------------------- in process


def test_valid_config_passes(tmp_path):
    P.check_config(P.compose(valid_overrides(tmp_path)))


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    base = valid_overrides(tmp_path)
    assert refusal(base + [f"{ACTOR}.entropy_mask_high=abc"]) == (
        f"{ACTOR}.entropy_mask_high must be a number, got 'abc'"
    )
    assert refusal(base + [f"{ACTOR}.erc_diagnostics.tokens_per_step=many"]) == (
        f"{ACTOR}.erc_diagnostics.tokens_per_step must be an integer, got 'many'"
    )
    assert refusal(base + ["trainer.nnodes=two"]) == "trainer.nnodes must be a positive integer, got 'two'"


def test_unregistered_erc_base_loss_is_refused_with_the_registered_names(tmp_path):
    erc = [f"{ACTOR}.policy_loss.loss_mode=erc", f"{ACTOR}.erc_base_loss_mode=bogus"]
    message = refusal(valid_overrides(tmp_path) + erc)
    names = sorted(n for n in POLICY_LOSS_REGISTRY if n not in ("erc", "grpo_erc", "gppo_erc"))
    assert message == (
        f"{ACTOR}.erc_base_loss_mode='bogus' is not a registered verl policy loss; choose one of {', '.join(names)}."
    )
    assert "gspo" in names and "vanilla" in names


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_misspelt_erc_key_gets_did_you_mean_and_the_erc_keys(tmp_path, prefix):
    """Without `+` Hydra refuses the override; with `+`/`++` verl's conversion to the actor dataclass does."""
    message = refusal(valid_overrides(tmp_path) + [f"{prefix}{ACTOR}.entropy_mask_hgh=1.1"])
    assert message.startswith(
        f"{ACTOR}.entropy_mask_hgh is not a key of the actor config; did you mean {ACTOR}.entropy_mask_high? ERC keys: "
    )
    listed = message.split("ERC keys: ")[1].rstrip(".").split(", ")
    expected = [k for k in expected_erc_keys() if k != "erc_diagnostics"]
    expected += [f"erc_diagnostics.{k}" for k in ("dir", "tokens_per_step", "max_records", "seed")]
    assert sorted(listed) == sorted(expected)


@pytest.mark.parametrize("prefix", ["", "+"])
def test_misspelt_nested_erc_key(tmp_path, prefix):
    assert refusal(valid_overrides(tmp_path) + [f"{prefix}{ACTOR}.erc_diagnostics.dri=/x"]).startswith(
        f"{ACTOR}.erc_diagnostics.dri is not a key of the erc_diagnostics config; did you mean "
        f"{ACTOR}.erc_diagnostics.dir? ERC keys: "
    )


def test_misspelt_key_of_a_verl_dataclass_section(tmp_path):
    """Any section verl builds a dataclass from (its `_target_`) gets the closest field, ours or not."""
    assert refusal(valid_overrides(tmp_path) + [f"+{ACTOR}.policy_loss.loss_mod=erc"]) == (
        f"{ACTOR}.policy_loss.loss_mod is not a key of the policy_loss config; did you mean "
        f"{ACTOR}.policy_loss.loss_mode?"
    )


def test_misspelt_verl_key_is_one_line_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as error:
        P.compose(valid_overrides(tmp_path) + ["trainer.total_epoch=3"])
    assert str(error.value) == (
        "trainer.total_epoch: Key 'total_epoch' is not in struct; did you mean trainer.total_epochs? "
        "(to add a key the config lacks, write +trainer.total_epoch=...)"
    )


def test_bad_bounds_are_config_errors(tmp_path):
    message = refusal(valid_overrides(tmp_path) + [f"{ACTOR}.entropy_mask_low=1.2", f"{ACTOR}.entropy_mask_high=1.1"])
    assert message.startswith("ERC needs 0 <= entropy_mask_low < entropy_mask_high, got low=1.2, high=1.1.")


def test_missing_train_file_names_the_setting_and_the_fix(tmp_path):
    missing = tmp_path / "nope" / "train.parquet"
    assert refusal(valid_overrides(tmp_path) + [f"data.train_files={missing}"]) == (
        f"data.train_files: {missing} does not exist; run scripts/prepare_data.py (it writes data/erc/, the recipes' "
        "DATA_DIR) or set data.train_files= (recipes: TRAIN_FILE= or DATA_DIR=)"
    )


def test_val_files_list_remote_uris_skipped_relative_paths_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = valid_overrides(tmp_path)
    (tmp_path / "here.parquet").touch()
    remote = "[hdfs://nn/a.parquet,s3://b/c.parquet,gs://d/e.parquet,here.parquet]"
    P.check_config(P.compose(base + [f"data.val_files={remote}"]))
    message = refusal(base + ["data.val_files=[here.parquet,gone.parquet,gone2.parquet]"])
    assert message.startswith(f"data.val_files: gone.parquet, gone2.parquet do not exist (relative to {tmp_path}); ")
    assert "VAL_FILES=" in message


def test_local_model_path_must_exist_hub_ids_are_not_checked(tmp_path):
    base = valid_overrides(tmp_path)
    missing = tmp_path / "ckpt"
    assert refusal(base + [f"actor_rollout_ref.model.path={missing}"]) == (
        f"actor_rollout_ref.model.path: {missing} does not exist; set actor_rollout_ref.model.path= (recipes: "
        f"MODEL_PATH=) to a local checkpoint directory or a Hugging Face id such as {HF_ID}"
    )
    assert "./ckpt does not exist" in refusal(base + ["actor_rollout_ref.model.path=./ckpt"])
    P.check_model_path(P.compose(base + ["actor_rollout_ref.model.path=someone/not-checked"]))
    missing.mkdir()
    P.check_model_path(P.compose(base + [f"actor_rollout_ref.model.path={missing}"]))


def test_gpu_count_against_the_ray_cluster(tmp_path, monkeypatch):
    config = P.compose(valid_overrides(tmp_path) + ["trainer.nnodes=2", "trainer.n_gpus_per_node=4"])
    P.check_gpu_count(config, {"GPU": 8.0, "CPU": 16.0})
    with pytest.raises(ConfigError) as error:
        P.check_gpu_count(config, {"CPU": 16.0})
    assert str(error.value).startswith(
        "trainer.nnodes * trainer.n_gpus_per_node = 2 * 4 = 8 GPUs, but the Ray cluster has 0; set "
        "trainer.n_gpus_per_node= and trainer.nnodes= (recipes: GPUS_PER_NODE=, NNODES=)"
    )
    assert "ray_kwargs.ray_init.num_gpus" in str(error.value)  # the CPU platform's logical GPUs

    # The stand-in runner run_ppo receives checks when run_ppo creates the runner, i.e. after ray.init.
    import ray

    created = []

    class Runner:
        @staticmethod
        def remote():
            created.append("remote")

        @staticmethod
        def options(**kwargs):
            created.append("options")
            return Runner

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 4.0})
    with pytest.raises(ConfigError, match="= 8 GPUs, but the Ray cluster has 4;"):
        P.GPUCheckedRunner(Runner, config).remote()
    with pytest.raises(ConfigError):
        P.GPUCheckedRunner(Runner, config).options(runtime_env={})
    assert created == []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 8.0})
    P.GPUCheckedRunner(Runner, config).options(runtime_env={}).remote()
    assert created == ["options", "remote"]


def test_hydra_texts_we_read_are_hydra_s_real_output(tmp_path):
    """The three patterns over Hydra's and Python's error texts, on what Hydra 1.3 really raises."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException
    from verl.utils.config import omega_conf_to_dataclass

    from erc_verl.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        with pytest.raises(HydraException) as error:
            compose(config_name=P.CONFIG_NAME, overrides=["trainer.total_epoch=3"])
        assert P._COULD_NOT.match(str(error.value)).groups() == ("override", "trainer.total_epoch")
        assert isinstance(error.value.__cause__, OmegaConfBaseException)
        config = compose(config_name=P.CONFIG_NAME, overrides=valid_overrides(tmp_path) + [
            f"+{ACTOR}.erc_diagnostics.dri=/x"])
    with pytest.raises(InstantiationException) as error:
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert P._FULL_KEY.search(str(error.value)).group(1) == f"{ACTOR}.erc_diagnostics"
    assert isinstance(error.value.__cause__, TypeError)
    assert P._UNEXPECTED.search(str(error.value.__cause__)).group(1) == "dri"


def test_hydra_s_private_argument_parser_is_what_launch_reads(monkeypatch):
    """launch() reads Hydra 1.3's private get_args_parser: fail here, not on a user's command line, when it moves."""
    args = P.hydra_args_parser().parse_args(["--cfg", "job", "-m", "--config-name", "n", "--config-path", "p",
                                             "--config-dir", "d", "a=1", "+b.c=2"])
    assert (args.cfg, args.multirun, args.config_name, args.config_path, args.config_dir) == ("job", True, "n", "p", "d")
    assert args.overrides == ["a=1", "+b.c=2"]
    assert not (args.help or args.hydra_help or args.info or args.shell_completion)
    for flags, attribute in ((["--help"], "help"), (["--hydra-help"], "hydra_help"), (["--info"], "info"),
                             (["--shell-completion"], "shell_completion")):
        assert getattr(P.hydra_args_parser().parse_args(flags), attribute)
    plain = P.hydra_args_parser().parse_args([])
    assert (plain.cfg, plain.multirun, plain.config_name, plain.config_path, plain.config_dir) == (
        None, False, None, None, None)

    import hydra

    monkeypatch.setattr(hydra, "__version__", "1.4.0")
    with pytest.raises(RuntimeError, match=r"Hydra 1\.3\.x's hydra\._internal\.utils\.get_args_parser, found Hydra 1\.4\.0"):
        P.hydra_args_parser()


def test_entry_point_detection():
    from erc_verl.seams.quiet import launched_as_entry_point

    assert launched_as_entry_point(["python", "-m", "erc_verl.main_ppo", "x=1"], "-m")
    assert launched_as_entry_point(["python", "-X", "dev", "-merc_verl.cli"], "-m")
    assert launched_as_entry_point(["python", "/venv/bin/erc-verl", "demo"], "/venv/bin/erc-verl")
    assert not launched_as_entry_point(["python", "-m", "pytest", "tests"], "-m")
    assert not launched_as_entry_point(["python", "-c", "import erc_verl"], "-c")


# ------------------------------------------------------------------------------------------- command lines


def run_cli(args, cwd, env=None, timeout=300):
    start = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})},
                         timeout=timeout)
    return out, time.monotonic() - start


def main_ppo(*args, cwd):
    return run_cli([sys.executable, "-m", "erc_verl.main_ppo", *args], cwd=cwd)


def assert_refused_before_ray(out, seconds, message):
    both = out.stdout + out.stderr
    assert out.returncode == 2, both[-3000:]
    assert out.stderr.rstrip("\n").splitlines()[-1] == f"erc-verl: error: {message}"
    assert "Traceback" not in both and "Error executing job" not in both
    assert "ray init kwargs" not in both and "Started a local Ray instance" not in both
    assert seconds < REFUSAL_SECONDS, seconds
    print(f"refused in {seconds:.1f} s: {message[:60]}")


BOUNDS = ("ERC needs 0 <= entropy_mask_low < entropy_mask_high, got low=1.2, high=1.1. Set "
          "actor_rollout_ref.actor.entropy_mask_low / actor_rollout_ref.actor.entropy_mask_high (paper: 0.95 / 1.05).")


@pytest.mark.integration
@pytest.mark.parametrize(
    "env,args,message",
    [
        ({"ENTROPY_MASK_LOW": "1.2", "ENTROPY_MASK_HIGH": "1.1"}, [], BOUNDS),
        ({}, [f"{ACTOR}.entropy_mask_high=abc"], f"{ACTOR}.entropy_mask_high must be a number, got 'abc'"),
    ],
    ids=["bounds", "type"],
)
def test_recipe_dry_run_refuses_a_bad_config(tmp_path, env, args, message):
    data_files(tmp_path)
    (tmp_path / "aime2024.parquet").touch()
    (tmp_path / "aime2025.parquet").touch()
    out, seconds = run_cli(["bash", str(REPO / "recipe" / "dapo_erc.sh"), *args], cwd=tmp_path,
                           env={"ERC_DRY_RUN": "1", "DATA_DIR": str(tmp_path), **env})
    assert_refused_before_ray(out, seconds, message)
    assert out.stdout == ""  # refused before Hydra prints the config


@pytest.mark.integration
def test_recipe_dry_run_refuses_missing_data(tmp_path):
    out, seconds = run_cli(["bash", str(REPO / "recipe" / "grpo.sh")], cwd=tmp_path, env={"ERC_DRY_RUN": "1"})
    assert_refused_before_ray(out, seconds, (
        f"data.train_files: data/erc/train.parquet does not exist (relative to {tmp_path}); run "
        "scripts/prepare_data.py (it writes data/erc/, the recipes' DATA_DIR) or set data.train_files= "
        "(recipes: TRAIN_FILE= or DATA_DIR=)"))


@pytest.mark.integration
@pytest.mark.parametrize("prefix", ["", "+"])
def test_cfg_job_refuses_a_misspelt_erc_key(tmp_path, prefix):
    out, seconds = main_ppo(*valid_overrides(tmp_path), f"{prefix}{ACTOR}.entropy_mask_hgh=1.1", "--cfg", "job",
                            cwd=tmp_path)
    assert_refused_before_ray(out, seconds, (
        f"{ACTOR}.entropy_mask_hgh is not a key of the actor config; did you mean {ACTOR}.entropy_mask_high? "
        f"ERC keys: {', '.join(erc_actor_keys())}."))


@pytest.mark.integration
def test_launch_refuses_an_unregistered_base_loss_before_ray(tmp_path):
    out, seconds = main_ppo(*valid_overrides(tmp_path), f"{ACTOR}.policy_loss.loss_mode=erc",
                            f"{ACTOR}.erc_base_loss_mode=bogus", cwd=tmp_path)
    names = sorted(n for n in POLICY_LOSS_REGISTRY if n not in ("erc", "grpo_erc", "gppo_erc"))
    assert_refused_before_ray(out, seconds, (
        f"{ACTOR}.erc_base_loss_mode='bogus' is not a registered verl policy loss; choose one of {', '.join(names)}."))


@pytest.mark.integration
def test_launch_refuses_missing_model_dir_before_ray(tmp_path):
    out, seconds = main_ppo(*valid_overrides(tmp_path), f"actor_rollout_ref.model.path={tmp_path}/ckpt", cwd=tmp_path)
    assert_refused_before_ray(out, seconds, (
        f"actor_rollout_ref.model.path: {tmp_path}/ckpt does not exist; set actor_rollout_ref.model.path= (recipes: "
        f"MODEL_PATH=) to a local checkpoint directory or a Hugging Face id such as {HF_ID}"))


@pytest.mark.integration
def test_launch_refuses_more_gpus_than_the_ray_cluster_has_right_after_ray_init(tmp_path):
    """Starts a local Ray instance (no GPUs here, or fewer than asked for) and nothing else."""
    out, seconds = main_ppo(*valid_overrides(tmp_path), "trainer.n_gpus_per_node=64", "ray_kwargs.ray_init.num_cpus=1",
                            cwd=tmp_path)
    both = out.stdout + out.stderr
    assert out.returncode == 2, both[-3000:]
    last = out.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("erc-verl: error: trainer.nnodes * trainer.n_gpus_per_node = 1 * 64 = 64 GPUs, but the Ray "
                           "cluster has ")
    assert "ray init kwargs" in both and "Traceback" not in both
    assert "TaskRunner" not in both  # the runner actor was never created
    assert seconds < 120, seconds
    print(f"refused after ray.init in {seconds:.1f} s")


@pytest.mark.integration
def test_help_prints_nothing_before_hydra_s_help():
    out = subprocess.run([sys.executable, "-m", "erc_verl.main_ppo", "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    first_useful = next(i for i, line in enumerate(lines) if line.startswith("main_ppo is powered by Hydra"))
    assert first_useful == 0, lines[:first_useful]


@pytest.mark.integration
def test_dry_run_prints_only_verl_s_validation_notices_before_the_config(tmp_path):
    train, val = data_files(tmp_path)
    out = subprocess.run([sys.executable, "-m", "erc_verl.main_ppo", *valid_overrides(tmp_path), "--cfg", "job"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    lines = out.stdout.splitlines()
    first_useful = next(i for i, line in enumerate(lines) if not line.startswith((" ", "/")) and ":" in line
                        and line.split(":")[0] in ("model_engine", "actor_rollout_ref"))
    # verl's validation notice for GRPO (no critic), with the source line Python's warnings echo under it
    before = [line for line in lines[:first_useful] if "Disabled critic" not in line and not line.startswith(" ")]
    assert before == ["[validate_config] All configuration checks passed successfully!"], lines[:first_useful]


@pytest.mark.integration
def test_dry_run_runs_the_launch_s_cpu_mode_refusals_too(tmp_path):
    """`--cfg job` goes through the same driver steps as a launch, CPU mode's included."""
    out, seconds = run_cli([sys.executable, "-m", "erc_verl.main_ppo", *valid_overrides(tmp_path),
                            f"{ACTOR}.strategy=fsdp", "--cfg", "job"], cwd=tmp_path, env={"VERL_PLATFORM": "cpu"})
    assert_refused_before_ray(out, seconds, (
        f"{ACTOR}.strategy='fsdp': CPU mode (VERL_PLATFORM=cpu) runs FSDP2 only (FSDP1 needs a GPU to sync module "
        f"states); set {ACTOR}.strategy=fsdp2."))
