"""How the tables beside this file were made: ask one SGLang version's own argparse about
the flags ``moe-scheduler sglang-args`` can emit.

Usage, with an interpreter that can import that version's ``sglang`` (its wheel unpacked
first on ``sys.path``; only what ``sglang.srt.server_args`` imports installed)::

    python derive.py VERSION [--stub-hf-utils] > VERSION.json

``--stub-hf-utils`` replaces ``sglang.srt.(utils.)hf_transformers_utils`` with a module
whose every function raises: up to 0.5.9 ``server_args.py`` imports it at module level,
it needs torchvision through transformers' ``AutoProcessor``, and only
``ServerArgs.__post_init__`` calls it, never the parser. Not a test; the tests read the
JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import warnings

#: What sglang-args emits, plus the extra arguments its tests and docs pass.
FLAGS = (
    "--model-path",
    "--nnodes",
    "--node-rank",
    "--dist-init-addr",
    "--tp-size",
    "--ep-size",
    "--attn-dp-size",
    "--enable-dp-attention",
    "--dp-size",
    "--moe-a2a-backend",
    "--deepep-mode",
    "--init-expert-location",
    "--ep-num-redundant-experts",
    "--ep-dispatch-algorithm",
    "--enable-return-routed-experts",
    "--schedule-policy",
    "--host",
    "--port",
    "--api-key",
    "--expert-distribution-recorder-mode",
    "--enable-metrics",
    "--disaggregation-mode",
    "--disaggregation-bootstrap-port",
    "--disaggregation-transfer-backend",
)


def _unavailable(*args: object, **kwargs: object) -> None:
    raise RuntimeError("stubbed by derive.py: the parser does not call it")


def _stub_getattr(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable


def main() -> None:
    version = sys.argv[1]
    warnings.simplefilter("ignore")
    if "--stub-hf-utils" in sys.argv:
        for name in ("sglang.srt.utils.hf_transformers_utils", "sglang.srt.hf_transformers_utils"):
            stub = types.ModuleType(name)
            stub.__getattr__ = _stub_getattr  # type: ignore[method-assign]
            sys.modules[name] = stub
    import sglang
    from sglang.srt.server_args import ServerArgs

    if sglang.__version__ != version:
        raise SystemExit(f"imported sglang {sglang.__version__} from {sglang.__file__}")
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    flags: dict[str, dict[str, object]] = {}
    for flag in FLAGS:
        action = parser._option_string_actions.get(flag)
        if action is None:
            flags[flag] = {"accepted": False}
            continue
        entry: dict[str, object] = {
            "accepted": True,
            "takes_value": action.nargs != 0,
            "spellings": sorted(o for o in action.option_strings if o != flag),
        }
        if action.choices is not None:
            entry["choices"] = sorted(str(c) for c in action.choices)
        flags[flag] = entry
    print(json.dumps({"sglang_version": version, "flags": flags}))


if __name__ == "__main__":
    main()
