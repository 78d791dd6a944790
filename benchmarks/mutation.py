"""Mutation testing of the modules that carry codsplat's promises, with cosmic-ray.

    .venv/bin/pip install cosmic-ray==8.7.0 "coverage>=7.10"   # not test dependencies: this is a benchmark
    .venv/bin/python benchmarks/mutation.py           # every module below (hours on 2 cores)
    .venv/bin/python benchmarks/mutation.py records lifecycle
    .venv/bin/python benchmarks/mutation.py --retest records   # last run's survivors with today's tests, then any left unrun
    .venv/bin/python benchmarks/mutation.py --resume records   # go on where an interrupted run stopped (mapped again
                                                               # if a test file changed since)

Each module is mutated, one mutant at a time, in a scratch copy of the working tree (so the tree
stays editable meanwhile). Its test files run once under coverage first, subprocesses included, to
map which tests reach each line; each mutant then runs the tests that reach its line, cheapest first
(a test's own time plus the set-up of the shared fixtures it uses), stopping at the first failure. The copy is imported as `codsplat` through a shim on PYTHONPATH, so
the tests' subprocesses (daemons, pipeline stages) run the mutant too. cosmic-ray rather than
mutmut: mutmut 3 names mutants by file path, and our folders install as `codsplat.*`; and it only
sees calls made in the pytest process, where most of our promises are kept in subprocesses.

Results: benchmarks/results/mutation.json (the score per module, before and after the last
retest) and benchmarks/results/mutation/<module>.json (every surviving mutant with its diff).
A survivor is either killed by a new test or listed in benchmarks/mutation_equivalent.toml with a
one-line reason; listed ones leave the score's denominator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"
SCRATCH = Path(os.environ.get("CODSPLAT_MUTATION_DIR", Path.home() / ".cache" / "codsplat" / "mutation"))


@dataclass(frozen=True)
class Module:
    path: str
    tests: list[str]  # the test files that may reach it; a mutant runs those of them that reach its line
    functions: list[str] | None = None  # only mutants inside these
    env: dict[str, str] = field(default_factory=dict)
    deselect: str | None = None  # a pytest -k expression, for tests that cannot run under `env`


# The compiled kernels run as Python for their mutants (NUMBA_DISABLE_JIT): compiling each mutant
# would take a minute. Two edge-case tests rely on numba's conversion of inf to int and are left out.
PYTHON_KERNELS = {"NUMBA_DISABLE_JIT": "1"}
MODULES: dict[str, Module] = {
    "records": Module("orchestrator/records.py", ["test_store_contract", "test_intake", "test_daemon_ops",
                                                  "test_daemon_embedded", "test_dynamodb_local", "test_fallback"]),
    "ownership": Module("orchestrator/ownership.py", ["test_ownership", "test_daemon_ops"]),
    "intake": Module("orchestrator/intake.py", ["test_intake", "test_hostile", "test_daemon_embedded", "test_daemon_aws"]),
    "lifecycle": Module("orchestrator/lifecycle.py", ["test_lifecycle", "test_daemon_ops", "test_daemon_embedded",
                                                      "test_fallback"]),
    "compute": Module("orchestrator/compute.py", ["test_job", "test_lifecycle", "test_bacalhau_client", "test_daemon_ops",
                                                  "test_daemon_embedded"]),
    "blobs": Module("orchestrator/blobs.py", ["test_blobs", "test_intake", "test_lifecycle", "test_console_api", "test_daemon_aws"]),
    "translate": Module("orchestrator/translate.py", ["test_bacalhau_client", "test_job", "test_entrypoint"]),
    "executor_bacalhau": Module("orchestrator/executors/bacalhau.py", ["test_bacalhau_outcomes", "test_bacalhau_watcher", "test_bacalhau_client", "test_daemon_aws"]),
    "executor_local": Module("orchestrator/executors/local.py", ["test_local_executor", "test_daemon_embedded", "test_daemon_ops"]),
    "executor_sagemaker": Module("orchestrator/executors/sagemaker.py", ["test_sagemaker_executor", "test_fallback"]),
    "config": Module("pipeline/config.py", ["test_config", "test_job", "test_hostile"]),
    "stages": Module("pipeline/stages.py", ["test_stages", "test_export", "test_hostile", "test_pipeline"]),
    "export": Module("pipeline/export.py", ["test_export", "test_formats", "test_pipeline"]),
    "formats": Module("pipeline/formats.py", ["test_formats"]),
    "raster_cpu": Module("pipeline/raster_cpu.py", ["test_raster"],
                         ["project_backward", "backward", "_sh_bases_grad"], PYTHON_KERNELS,
                         "not overflows and not edge_cases"),
}

# Which mutants. Every boolean, branch, loop and exception mutant; for arithmetic and comparisons the
# one or two replacements a slip of the hand makes (+ for -, < for <=, == for !=), not all 11 or 9
# that cosmic-ray offers, which would mostly repeat each other at eight times the cost. Numbers only
# in the numeric modules: elsewhere a constant is a setting whose value the tests pin directly.
PAIRS = {
    "ReplaceBinaryOperator": ["Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div", "Mod_FloorDiv",
                              "Pow_Mul", "BitOr_BitAnd", "BitAnd_BitOr", "LShift_RShift", "RShift_LShift"],
    "ReplaceComparisonOperator": ["Eq_NotEq", "NotEq_Eq", "Lt_LtE", "Lt_GtE", "LtE_Lt", "LtE_Gt", "Gt_GtE",
                                  "Gt_LtE", "GtE_Gt", "GtE_Lt", "Is_IsNot", "IsNot_Is", "In_NotIn", "NotIn_In"],
    "ReplaceUnaryOperator": ["USub_UAdd", "Delete_Not", "Delete_USub"],
}
# (Not raster_cpu: its numbers are mostly indices, 1,000 mutants at 20 s each as Python; its
# arithmetic and comparisons are mutated; a wrong index fails the gradient tests on a turned camera,
# which the first run's index mutants showed the tests lacked.)
NUMERIC = {"export", "formats"}
# A mutant runs the fastest tests that reach its line until their measured time passes this: a
# survivor otherwise costs every daemon test that passes through the line (up to 20 minutes here).
# A retest, of the survivors alone, gives each the slower tests too.
TEST_BUDGET_SECONDS = 45
RETEST_BUDGET_SECONDS = 300


def operators(name: str) -> list[str]:
    """The cosmic-ray operators to leave out for this module (the filter takes exclusions)."""
    listed = subprocess.run([bin_("cosmic-ray"), "operators"], capture_output=True, text=True, check=True).stdout.split()
    keep = {f"core/{family}_{pair}" for family, pairs in PAIRS.items() for pair in pairs}
    keep |= {"core/AddNot", "core/ReplaceTrueWithFalse", "core/ReplaceFalseWithTrue", "core/ReplaceAndWithOr",
             "core/ReplaceOrWithAnd", "core/ReplaceBreakWithContinue", "core/ReplaceContinueWithBreak",
             "core/ExceptionReplacer", "core/ZeroIterationForLoop", "core/RemoveDecorator"}
    if name in NUMERIC:
        keep.add("core/NumberReplacer")
    return [f"^{op}$" for op in listed if op not in keep]  # patterns, matched from the start


def bin_(tool: str) -> str:
    return str(Path(sys.executable).parent / tool)


def scratch_copy(work: Path) -> Path:
    """The working tree's files (tracked and new, not ignored) copied under work/repo, plus the
    `codsplat` import shim and links to the installed tools the tests read."""
    repo = work / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        source, target = ROOT / rel, repo / rel
        if source.is_file() and not source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for linked in ("node_modules", ".venv-checks", "orchestrator/console/static/dist"):  # installed or built here
        if (ROOT / linked).exists() and not (repo / linked).exists():
            (repo / linked).symlink_to(ROOT / linked)
    shim = work / "import" / "codsplat"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").touch()
    for root in ("orchestrator", "pipeline", "jobspecs", "aws"):
        if not (shim / root).exists():
            (shim / root).symlink_to(repo / root)
    return repo


def run_module(name: str, retest: bool, resume: bool = False) -> dict:
    module = MODULES[name]
    path = module.path
    work = SCRATCH / name
    resume = resume and (work / "session.sqlite").exists()
    if not (retest or resume):
        shutil.rmtree(work, ignore_errors=True)
    elif (ROOT / path).read_text() != (work / "pristine.py").read_text():
        raise SystemExit(f"{name}: {path} changed since its mutants were made; run it afresh (without --retest)")
    repo = scratch_copy(work)
    session, config = work / "session.sqlite", work / "config.toml"
    env = {**environment(work), **module.env}
    before = None
    if resume:  # the mutants not run yet, with the map made when the run began, unless a test file changed since
        if any((ROOT / "tests" / f"{t}.py").stat().st_mtime > (work / "tests.json").stat().st_mtime for t in module.tests):
            map_tests(name, work, repo, env)
    elif not retest:
        map_tests(name, work, repo, env)
        shutil.copy2(repo / path, work / "pristine.py")
        config.write_text(
            "[cosmic-ray]\n"
            f"module-path = {json.dumps(path)}\n"
            "timeout = 900\n"  # a backstop: run_tests stops a mutant's tests itself at 3× their time
            "excluded-modules = []\n"
            f"test-command = {json.dumps(f'{sys.executable} {Path(__file__).resolve()} run-tests {name}')}\n"
            "[cosmic-ray.distributor]\nname = \"local\"\n"
            "[cosmic-ray.filters.operators-filter]\n"
            f"exclude-operators = {json.dumps(operators(name))}\n")
        subprocess.run([bin_("cosmic-ray"), "init", str(config), str(session)], cwd=repo, env=env, check=True)
        subprocess.run([bin_("cr-filter-operators"), str(session), str(config)], cwd=repo, env=env, check=True)
        skip(session, repo / path, module.functions)
    else:
        # Today's tests against last run's survivors: mapped again; their results are forgotten below.
        if not (work / "first.sqlite").exists():
            shutil.copy2(session, work / "first.sqlite")
        listed: set[str] = set()
        before = score(name, session, equivalent_ids=listed)
        map_tests(name, work, repo, env)
    started = time.monotonic()
    if retest:  # last run's survivors first, with the slower tests' budget too; then whatever it left unrun
        with sqlite3.connect(session) as db:
            db.execute("INSERT INTO work_results (job_id, worker_outcome, output) SELECT s.job_id, 'SKIPPED', 'later' "
                       "FROM mutation_specs s LEFT JOIN work_results r ON r.job_id = s.job_id WHERE r.job_id IS NULL")
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED' AND job_id NOT IN (SELECT value FROM json_each(?))",
                       (json.dumps(sorted(listed)),))  # those listed as equivalent stay as they are
        subprocess.run([bin_("cosmic-ray"), "exec", str(config), str(session)], cwd=repo,
                       env={**env, "CODSPLAT_MUTATION_BUDGET": str(RETEST_BUDGET_SECONDS)}, check=True)
        with sqlite3.connect(session) as db:
            db.execute("DELETE FROM work_results WHERE worker_outcome = 'SKIPPED' AND output = 'later'")
    subprocess.run([bin_("cosmic-ray"), "exec", str(config), str(session)], cwd=repo, env=env, check=True)
    if not retest:  # the run before any test written against its survivors: the score's "before"
        shutil.copy2(session, work / "first.sqlite")
    report = score(name, session)
    report["seconds"] = round(time.monotonic() - started)
    if before:
        report["before_retest"] = {k: before[k] for k in ("killed", "survived", "equivalent", "score")}
    return report


def environment(work: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{work / 'import'}{os.pathsep}{Path(__file__).resolve().parent}",
            "PYTHONDONTWRITEBYTECODE": "1"}


def map_tests(name: str, work: Path, repo: Path, env: dict[str, str]) -> None:
    """Run the module's test files once under coverage, subprocesses included, and keep which tests
    reach each line of the module, and how long each test took: a mutant then runs only the tests
    that reach its line, fastest first (what makes a 2-core run take hours, not days)."""
    path, tests = MODULES[name].path, MODULES[name].tests
    deselect = ["-k", MODULES[name].deselect] if MODULES[name].deselect else []
    cov = work / "coverage"
    shutil.rmtree(cov, ignore_errors=True)
    cov.mkdir(parents=True)
    rc = cov / "rc"
    rc.write_text(f"[run]\ndata_file = {cov / 'data'}\nparallel = true\npatch = subprocess\nsigterm = true\n"
                  f"include =\n    {repo / path}\n    {work / 'import' / 'codsplat' / path}\n")
    durations = cov / "durations.json"
    run = subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-q",
                          "-p", "no:randomly", "-p", "no:cacheprovider", "-p", "mutation_plugin",
                          *deselect, *(f"tests/{t}.py" for t in tests)],
                         cwd=repo, env={**env, "CODSPLAT_MUTATION_DURATIONS": str(durations)},
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name}: its tests fail before any mutation:\n{run.stdout[-3000:]}")
    subprocess.run([sys.executable, "-m", "coverage", "combine", f"--rcfile={rc}", "-q"], cwd=repo, env=env, check=True)
    import coverage

    data = coverage.CoverageData(basename=str(cov / "data"))
    data.read()
    seconds = json.loads(durations.read_text())
    lines: dict[int, list[str]] = {}
    for measured in data.measured_files():
        for line, contexts in data.contexts_by_lineno(measured).items():
            # A line run at import (a default, a constant, a decorator) is in no test's context, yet
            # every test may depend on it: such a line's mutants run the whole budget of tests.
            reached = set(seconds) if "" in contexts else {c for c in contexts if c in seconds}
            lines[line] = sorted(set(lines.get(line, [])) | reached, key=seconds.get)
    (work / "tests.json").write_text(json.dumps({"seconds": seconds, "lines": lines}))


def run_tests(name: str) -> int:
    """cosmic-ray's test command: the tests that reach the lines the mutant changed, fastest first,
    stopping at the first failure. A mutant no test reaches survives, and says so."""
    import difflib

    path = MODULES[name].path
    work = SCRATCH / name
    mapped = json.loads((work / "tests.json").read_text())
    pristine = (work / "pristine.py").read_text().splitlines()
    mutated = (work / "repo" / path).read_text().splitlines()
    changed = set()
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, pristine, mutated, autojunk=False).get_opcodes():
        if tag != "equal":
            changed |= set(range(i1 + 1, max(i2, i1 + 1) + 1))
    tests = {t for line in changed for t in mapped["lines"].get(str(line), [])}
    if not tests:
        print(f"no test reaches line(s) {sorted(changed)}")
        return 0
    ordered, budget, limit = [], 0.0, float(os.environ.get("CODSPLAT_MUTATION_BUDGET", TEST_BUDGET_SECONDS))
    for test in sorted(tests, key=lambda t: mapped["seconds"].get(t, 0)):  # fastest first, a budget's worth
        if ordered and budget + mapped["seconds"].get(test, 0) > limit:
            break
        ordered.append(test)
        budget += mapped["seconds"].get(test, 0)
    # A mutant that makes its tests run three times as long as they did hangs something: killed, as
    # mutmut and cosmic-ray count a timeout (the tests' own waits would say so, many minutes later).
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                            *ordered], cwd=work / "repo", start_new_session=True)
    try:
        return run.wait(timeout=30 + 3 * budget)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        print(f"timed out after {30 + 3 * budget:.0f} s (the tests took {budget:.0f} s unmutated)")
        return 1


def skip(session: Path, module: Path, functions: list[str] | None) -> None:
    """Leave out mutants that cannot change behaviour or are not measured here: those inside type
    annotations of a module with `from __future__ import annotations` (never evaluated: `A | None`
    → `A & None` is the same program), and with `functions`, those outside them (raster_cpu's
    backward kernels)."""
    import ast

    tree = ast.parse(module.read_text())
    spans = [(n.lineno, n.end_lineno) for n in ast.walk(tree)
             if isinstance(n, ast.FunctionDef) and functions and n.name in functions]
    lazy = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
               for n in tree.body)
    annotations = [a for n in ast.walk(tree) for a in (
        [n.annotation] if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation else
        [n.returns] if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns else [])] if lazy else []

    def inside(node, row, col):
        return (node.lineno, node.col_offset) <= (row, col) < (node.end_lineno, node.end_col_offset)

    with sqlite3.connect(session) as db:
        rows = db.execute("SELECT s.job_id, s.start_pos_row, s.start_pos_col FROM mutation_specs s "
                          "LEFT JOIN work_results r ON r.job_id = s.job_id WHERE r.job_id IS NULL").fetchall()
        left_out = [(job, "in an annotation, never evaluated") for job, row, col in rows
                    if any(inside(a, row, col) for a in annotations)]
        if functions:
            left_out += [(job, "outside the functions measured") for job, row, col in rows
                         if not any(a <= row <= b for a, b in spans)]
        db.executemany("INSERT OR IGNORE INTO work_results (job_id, worker_outcome, output) VALUES (?, 'SKIPPED', ?)",
                       left_out)


def equivalents() -> list[dict]:
    return tomllib.loads(EQUIVALENT.read_text()).get("equivalent", []) if EQUIVALENT.exists() else []


def score(name: str, session: Path, write: bool = True, equivalent_ids: set[str] | None = None) -> dict:
    """Killed / (killed + survivors not listed as equivalent). A mutant that breaks the import or
    times out counts as killed, as cosmic-ray counts it. `equivalent_ids` collects the listed ones."""
    path = MODULES[name].path
    dump = subprocess.run([bin_("cosmic-ray"), "dump", str(session)], capture_output=True, text=True, check=True)
    source = (SCRATCH / name / "pristine.py").read_text().splitlines()  # the repo's copy may hold a mutant now
    listed = [e for e in equivalents() if e["module"] == path]
    killed, survivors, equivalent, pending, incompetent, left_out = 0, [], [], 0, 0, 0
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        if not result:
            pending += 1
            continue
        if result["worker_outcome"] == "skipped":  # an operator left out above, or one skip() left out
            left_out += (result.get("output") or "").startswith("in an annotation")
            continue
        mutation = item["mutations"][0]
        if result["test_outcome"] == "incompetent":  # the mutation could not be made or run
            incompetent += 1
            continue
        if result["test_outcome"] != "survived":
            killed += 1
            continue
        text = source[mutation["start_pos"][0] - 1].strip()
        entry = {"operator": mutation["operator_name"], "line": mutation["start_pos"][0], "source": text,
                 "occurrence": mutation["occurrence"], "diff": result.get("diff", "")}
        mutated = " ".join(l[1:] for l in entry["diff"].splitlines() if l.startswith("+") and not l.startswith("+++"))
        why = next((e["why"] for e in listed if e["operator"] == entry["operator"] and e["source"] == text
                    and e.get("mutant", "") in mutated), None)
        (equivalent if why else survivors).append({**entry, "why": why} if why else entry)
        if why and equivalent_ids is not None:
            equivalent_ids.add(item["job_id"])
    counted = killed + len(survivors)
    first = session.with_name("first.sqlite")
    if session.name == "session.sqlite" and first.exists():  # counted with today's list of equivalents
        report_first = score(name, first, write=False)
        first_run = {k: report_first[k] for k in ("killed", "survived", "equivalent", "pending", "score")}
    else:
        first_run = None
    report = {"module": path, "mutants": killed + len(survivors) + len(equivalent) + pending + incompetent,
              "killed": killed, "survived": len(survivors), "equivalent": len(equivalent), "pending": pending,
              "incompetent": incompetent, "in_annotations": left_out,
              "score": round(killed / counted, 3) if counted else None, **({"first_run": first_run} if first_run else {})}
    if not write:
        return report
    out = RESULTS / "mutation" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "survivors": survivors, "equivalent_mutants": equivalent}, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["run-tests"]:
        raise SystemExit(run_tests(sys.argv[2]))
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--retest", action="store_true", help="run the last run's survivors again, then any not run yet")
    parser.add_argument("--resume", action="store_true", help="go on with the mutants an interrupted run left")
    parser.add_argument("--score", action="store_true", help="recount from the saved sessions, running nothing")
    args = parser.parse_args()
    summary_path = RESULTS / "mutation.json"
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        parser.error(f"no module {', '.join(sorted(unknown))}; valid: {', '.join(MODULES)}")
    for name in args.modules or MODULES:
        if args.score:
            report = score(name, SCRATCH / name / "session.sqlite")
        else:
            report = run_module(name, args.retest, args.resume)
        # read just before writing: runs of other modules, in other processes, write it too
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"modules": {}}
        summary["modules"][name] = {**summary["modules"].get(name, {}), **report}
        summary_path.write_text(json.dumps(summary, indent=2))
        print(json.dumps({name: report}), flush=True)


if __name__ == "__main__":
    main()
