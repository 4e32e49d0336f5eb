"""Count the bad-input battery by class: ``python -m tests.battery_count``.

Collects the battery files with ``pytest --collect-only`` (nothing runs) and sorts each case
into a class by its test function and parameter id (first matching rule wins). Positive
controls (a good input passes) are listed apart and not counted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/test_bad_inputs.py", "tests/test_bad_inputs_values.py",
         "tests/test_bad_inputs_env.py", "tests/test_safety.py"]
CONTROL = "(control: a good input passes; not counted)"

#: (pattern searched in "file::test[id]", class), first match wins
RULES: list[tuple[str, str]] = [
    (r"test_good_|a_good_|every_target_in_conf|alive_or_remote|allow_targets_lets|"
     r"trust_remote_code_is_off|no_unsafe_torch_load|problem_then_fix|"
     r"searchpath_options_hydra_accepts|good-madx|sweep_jobs_follow", CONTROL),
    (r"test_bad_value\[pipeline-", "a bad later stage"),
    (r"test_every_sweep_job|a_bad_sweep_job", "a bad sweep job"),
    (r"test_bad_value\[(data-|test-file|jsonl-|csv-)", "data files, formats, encodings"),
    (r"test_bad_command_line_value|pretrained_name_over", "model settings (model.config keys)"),
    (r"test_bad_inputs_values\.py", "values out of range / wrong type"),
    (r"test_bad_command_line|test_cli_end_to_end", "command line (pre-flight)"),
    (r"test_bad_run_input\[pipeline-", "a bad later stage"),
    (r"test_bad_run_input\[(model|tokenizer|peft-incompatible)", "model and checkpoint refs"),
    (r"test_bad_run_input\[(data-(file|format|malformed|not-utf8|columns|uri|zip))|"
     r"unreadable_file|same_rows_in_every_format|csv_with_a_string|explicit_format",
     "data files, formats, encodings"),
    (r"test_bad_run_input\[(text-|label-|three-|one-label|all-|split-)",
     "columns, labels, splits"),
    (r"test_bad_run_input\[(batch-|capped-)", "sizes"),
    (r"test_bad_run_input\[", "config keys, types, references"),
    (r"target|malicious|yaml_python_tag|shared_primary|experiment_cannot|allowed_modules|"
     r"every_job_of_a_sweep", "config that would run code"),
    (r"stage_name|stage_key_with|write_inside|stay_inside", "names that would become paths"),
    (r"cache_entry", "corrupt stage cache"),
    (r"write_fault|full_disk|disk_full|config_copy|output_folder|read_only|unwritable|offline",
     "environment: disk, permissions, network"),
    (r"signal|sigterm|killed|reused_pid|rerun_in|degenerate|nan_loss",
     "status: signals, killed jobs, degenerate runs, NaN"),
]


def collect(files: list[str]) -> list[str]:
    present = [f for f in files if (ROOT / f).is_file()]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "",
                           "-p", "no:cacheprovider", *present], cwd=ROOT, capture_output=True,
                          text=True)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    if not ids:
        sys.exit(f"battery_count: nothing collected\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return ids


def classify(node: str) -> str:
    return next((name for pattern, name in RULES if re.search(pattern, node)),
                f"other ({node.split('::')[0]})")


def main() -> None:
    ids = collect(FILES)
    by_class = Counter(classify(i) for i in ids)
    by_file = Counter(i.split("::")[0] for i in ids if classify(i) != CONTROL)
    controls = by_class.pop(CONTROL, 0)
    width = max(map(len, by_class))
    print("Bad-input battery by class")
    for name, n in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<{width}}  {n:4d}")
    print(f"  {'total':<{width}}  {sum(by_class.values()):4d}   (+{controls} controls)")
    print("By file")
    for name, n in sorted(by_file.items()):
        print(f"  {name:<{width}}  {n:4d}")


if __name__ == "__main__":
    main()
