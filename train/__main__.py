"""`python -m train [key=value ...]`: run the configured curriculum (the CPU demo with no arguments)."""
from __future__ import annotations

import contextlib
import re
import sys
import traceback

# a secret key inside a dict value (`logging.wandb={mode: online, api_key: ...}`), quoted or not
_INLINE_SECRET = re.compile(r"([\w-]*(?:api[_-]?key|token|secret|password))['\"]?\s*:", re.IGNORECASE)


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends; Hydra would take it for an override."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def _is_secret_override(arg: str) -> bool:
    import dataclasses

    from train.config import WandbConfig
    from train.metrics import is_secret_key

    key, sep, _ = arg.partition("=")
    key = key.lstrip("+~")
    if not sep or arg.startswith("-") or key.startswith("hydra."):
        # hydra.* keys stay Hydra's (e.g. hydra.job.env_set.WANDB_API_KEY=..., an environment variable it sets;
        # `_hidden_hydra_secrets` takes its value off sys.argv once Hydra has read it)
        return False
    # a key of logging.wandb that is no setting (`api_kye`, `key`) is a typo'd secret: Hydra's refusal quoted its
    # value ("To append to your config use +logging.wandb.api_kye=<the key>"); applied as one, the error hides it
    typo = key.startswith("logging.wandb.") and key[len("logging.wandb."):] not in {
        f.name for f in dataclasses.fields(WandbConfig)}
    return typo or is_secret_key(key.split(".")[-1])


def _hidden_hydra_secrets(argv: list[str]) -> list[str]:
    """`argv` with the values of secret hydra.* overrides (hydra.job.env_set.WANDB_API_KEY=...) as ***: Hydra has
    read them when the job starts, and wandb records sys.argv with the run."""
    from train.metrics import is_secret_key

    def hidden(arg: str) -> str:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        secret = is_secret_key(bare.split(".")[-1]) or ("{" in value and _INLINE_SECRET.search(value))
        return f"{key}=***" if sep and bare.startswith("hydra.") and secret else arg

    return [hidden(a) for a in argv]


def refuse_swept_hydra_secret(argv: list[str]) -> None:
    """A hydra.* secret (`+hydra.job.env_set.WANDB_API_KEY=...`) under --multirun is refused (ConfigError, the
    value unprinted): the sweeper writes every override into <sweep dir>/multirun.yaml before any job starts."""
    from train.config import ConfigError

    if not {"-m", "--multirun"} & set(argv):
        return
    for arg in _hidden_hydra_secrets(argv):
        if arg.endswith("=***"):
            raise ConfigError(f"{arg[:-4].lstrip('+~')}: a secret for Hydra under --multirun would be written into "
                              f"the sweep's multirun.yaml; set it in the environment instead (WANDB_API_KEY)")


def take_secrets(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its secret overrides, those overrides). Hydra never sees a secret: it would print it when a
    sweep starts a job and write it to multirun.yaml and .hydra/overrides.yaml. They are applied to the composed
    config instead, in the job (`_apply_secrets`). A secret inside a dict value is refused (ConfigError, naming
    both keys and not the value): that override, which Hydra must see for its other keys, would carry it into
    sys.argv, which wandb records with the run."""
    from train.config import ConfigError

    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        inline = _INLINE_SECRET.search(value) if sep and "{" in value and not arg.startswith("-") else None
        if inline and not key.startswith("hydra.") and not _is_secret_override(arg):
            where = _secret_path(arg) or f"{key}.<...>.{inline.group(1)}"
            env = " or WANDB_API_KEY in the environment" if where == "logging.wandb.api_key" else ""
            raise ConfigError(f"config key '{key}': its value holds the secret '{inline.group(1)}', which would be "
                              f"recorded with the command line (wandb keeps it with the run): give it as an "
                              f"override of its own, {where}=...{env}")
    return [a for a in argv if not _is_secret_override(a)], [a for a in argv if _is_secret_override(a)]


def _secret_path(arg: str) -> str | None:
    """The dotted key of the first secret inside the dict value of override `arg` (None if it does not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train.metrics import is_secret_key

    try:
        override = OverridesParser.create().parse_overrides([arg])[0]
        value = override.value()
    except Exception:  # noqa: BLE001 - Hydra refuses it later, with its own message
        return None
    todo = [(override.key_or_group, value)]
    while todo:
        path, node = todo.pop(0)
        for k, v in node.items() if isinstance(node, dict) else []:
            if is_secret_key(str(k)):
                return f"{path}.{k}"
            todo.append((f"{path}.{k}", v))
    return None


def _apply_secrets(dcfg, secrets: list[str]) -> None:
    """Set each secret override on the composed config, its value parsed as Hydra parses one (`null`, quotes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    parser = OverridesParser.create()
    for arg in secrets:
        key = arg.partition("=")[0].lstrip("+~")
        try:
            override = parser.parse_overrides([arg])[0]
        except Exception:  # noqa: BLE001 - the parser's message would quote the secret
            raise ValueError(f"{key}: the value is not a valid override value (a comma, '=' or a bracket in it?); "
                             f"quote it: {key}='...'") from None
        if override.is_delete() or override.is_sweep_override():
            raise ValueError(f"{key}: a secret can be set from the command line, not deleted or swept "
                             f"(quote a value with a comma in it)")
        with open_dict(dcfg) if override.is_add() or override.is_force_add() else contextlib.nullcontext():
            OmegaConf.update(dcfg, key, override.value(), merge=False)


def main() -> None:
    """Hydra entry point; exits with the run's code (75 after a SIGTERM checkpoint, so schedulers requeue)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    from train.config import ConfigError, register_configs

    register_configs()

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def _app(dcfg: DictConfig) -> None:
        from train.config import ConfigError, check_known_keys, validate, world_from_env

        started.append(True)
        sys.argv = _hidden_hydra_secrets(sys.argv)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # each sweep job trains in its own folder
            if any(o.lstrip("+~").startswith("run_dir=") for o in HydraConfig.get().overrides.task):
                print("error: config key 'run_dir': under --multirun each job trains in <hydra.sweep.dir>/<job "
                      "number>-<hash of its overrides>/; set hydra.sweep.dir=<folder> instead", file=sys.stderr,
                      flush=True)
                _exit(2)
            dcfg.run_dir = HydraConfig.get().runtime.output_dir
        try:
            _apply_secrets(dcfg, secrets)
            resolved = OmegaConf.to_container(dcfg, resolve=True)
            cfg = OmegaConf.to_object(dcfg)
            check_known_keys(resolved, cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:  # an interpolation or type error found at resolution time
            print(f"error: config: {redact_text(str(e), secrets)}", file=sys.stderr, flush=True)
            sys.exit(2)
        try:
            # every check that needs no torch runs before torch loads (with train.loop): a refused command line
            # is answered in a second, on every rank alike, and no process group starts
            plans = validate(cfg, world_from_env()[1])
            from train.loop import run

            code = run(cfg, resolved, plans)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = 2
        except Exception:  # noqa: BLE001 - printed here so Hydra does not echo the overrides (maybe a secret)
            traceback.print_exc()
            code = 1
        if code and HydraConfig.get().mode != RunMode.MULTIRUN:
            _exit(code)
        codes.append(code)

    codes: list = []  # the sweep's exit codes, job by job
    started: list = []  # set once Hydra has composed a config and called the job
    # what records argv later (wandb, crash reports) sees it without the secrets, as Hydra does
    try:
        refuse_swept_hydra_secret(sys.argv)
        sys.argv, secrets = take_secrets(_strip_launcher_args(sys.argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _exit(2)
    try:
        _app()
    except SystemExit as e:
        # Hydra exits 1 on an override it cannot compose (an unknown key, a value of the wrong type): a config
        # error, which is exit 2 everywhere else
        if not started and e.code == 1:
            _exit(2)
        raise
    _exit(next((c for c in codes if c), 0))  # a sweep fails with its first failed job's code


def redact_text(text: str, secrets: list[str]) -> str:
    """`text` with every secret value in it (as given, and without its quotes) replaced by ***."""
    for arg in secrets:
        value = arg.partition("=")[2]
        for form in (value, value.strip("'\"")):
            if form:
                text = text.replace(form, "***")
    return text


def _exit(code: int) -> None:
    """End the process with `code` once Python's exit handlers have run (the process group is destroyed there,
    wandb finishes), skipping the C++ teardown after them: a gloo or autograd thread still joinable when the
    static destructors run aborts the process ("terminate called without an active exception", SIGABRT),
    which torchrun then reports as a failed rank after a run that succeeded (seen on 2 gloo ranks)."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
