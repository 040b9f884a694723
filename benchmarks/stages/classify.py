"""`python -m benchmarks BENCH classify --out DIR [rules]`: GOOD / BAD per captured sample.

Reads `DIR/responses.jsonl` and the data flags recorded in `DIR/capture.json`; writes
`DIR/classification.json` = `{"GOOD": [{"id", "group", ...metrics}], "BAD": [...], "rules",
"counts"}`.
Rules (docs/benchmarks.md, "Capture and classify"; those not given as recorded in
classification.json): POPE and yes/no questions GOOD when the official parser's answer is right;
AMBER discriminative when the exact "Yes" / "No" is right; open questions when the first word is
the answer; captions by --caption-rule / --min-cover.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from benchmarks import outputs
from benchmarks.adapters import Rules, Verdict, check_rules, get_adapter
from benchmarks.stages import stage_parser
from vlm_sparsify.files import read_json


@dataclass
class ClassifyConfig:
    """GOOD / BAD per captured sample (the benchmark's rules below)."""

    out: str
    """Output folder of `capture` (holds responses.jsonl and capture.json)."""


def classification(verdicts: list[Verdict], rules: Rules) -> dict:
    """The classification.json document: GOOD / BAD lists, the rules, counts overall and per group."""
    result: dict = {"GOOD": [], "BAD": []}
    groups: dict[str, Counter] = {}
    for verdict in verdicts:
        label = "GOOD" if verdict.good else "BAD"
        result[label].append({"id": verdict.id, "group": verdict.group, **verdict.metrics})
        groups.setdefault(verdict.group, Counter())[label] += 1
    result["rules"] = asdict(rules)
    result["counts"] = {
        "GOOD": len(result["GOOD"]),
        "BAD": len(result["BAD"]),
        "total": len(verdicts),
        "groups": {name: {"GOOD": c["GOOD"], "BAD": c["BAD"]} for name, c in groups.items()},
    }
    return result


def parse_rules(argv: list[str], benchmark: str) -> tuple[Path, Rules]:
    """The output folder and the rules: the flags given; those not given as recorded in
    OUT/classification.json's `rules` (so classify alone after a custom classify or `all` keeps
    them, as analyze keeps its parameters), else the defaults of `Rules`."""
    config = (
        stage_parser(benchmark, "classify", ClassifyConfig, rules=Rules).parse_args(argv).config
    )
    out = Path(config.out)
    recorded = recorded_rules(out / outputs.CLASSIFICATION)
    parser = stage_parser(benchmark, "classify", ClassifyConfig)
    parser.add_arguments(Rules, dest="rules", default=Rules(**recorded))
    rules = parser.parse_args(argv).rules
    kept = [
        f"{k}={v}" for k, v in recorded.items() if getattr(Rules(), k) != v == getattr(rules, k)
    ]
    if kept:
        print(f"classify: as recorded in {out / outputs.CLASSIFICATION}: {', '.join(kept)}")
    return out, rules


def recorded_rules(path: Path) -> dict:
    """The `rules` of an earlier classification.json that are still `Rules` fields."""
    if not path.is_file():
        return {}
    recorded = read_json(path, keys=()).get("rules", {})
    return {key: value for key, value in recorded.items() if key in {f.name for f in fields(Rules)}}


def main(argv: list[str], benchmark: str) -> None:
    out, rules = parse_rules(argv, benchmark)
    adapter = get_adapter(benchmark)
    try:
        check_rules(rules)
        if rules.questions_dir and "questions_dir" not in {f.name for f in fields(adapter.Data)}:
            raise ValueError(f"--questions-dir is POPE's (its label files); {benchmark} has none")
        data = adapter.Data(**outputs.capture_info(out, benchmark)["data"])
        records = outputs.read_append_log(out / outputs.RESPONSES)
        if not records:
            raise ValueError(f"{out / outputs.RESPONSES} holds no responses: run capture first")
        result = classification(adapter.classify(data, records, rules), rules)
    except (ValueError, OSError, RuntimeError) as err:
        raise SystemExit(f"{benchmark} classify: {err}") from err
    path = out / outputs.CLASSIFICATION
    if not path.is_file() or read_json(path) != json.loads(json.dumps(result)):
        outputs.write_json(path, result)  # unchanged: left alone, so later stages stay current
    counts = result["counts"]
    groups = ", ".join(f"{g} {c['GOOD']}/{c['BAD']}" for g, c in counts["groups"].items())
    print(f"GOOD {counts['GOOD']}  BAD {counts['BAD']}  of {counts['total']}  (GOOD/BAD: {groups})")
    print(json.dumps(counts))
