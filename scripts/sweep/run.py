"""Running a sweep's stages as jobs of submitit: on this machine (its local executor, a few at a time, each stage once
the fits it reads are recorded) or on SLURM (every stage submitted at once, each held until the jobs of the fits it
reads have ended well). Either way a job runs one `ssvae` command and then records it (``stage_job``)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cloudpickle
import submitit

import sweep
from sweep.plan import ROOT, SSVAE, Stage, command_line, shown, stage_seconds
from sweep.records import (StageFailed, check_same_command, code_version, finish_record, forget_lost_fits, load_cache,
                           update_records, write_json)

cloudpickle.register_pickle_by_value(sweep)  # a job unpickles the sweep's code without scripts/ on its path
POLL_SECONDS = 0.5  # how often the local loop looks at its jobs
DAY_MINUTES = 24 * 60  # a SLURM job's time limit where its fit has none (--slurm time=MINUTES sets another)
MIN_JOB_MINUTES = 10  # at least this: SLURM may signal a job's end (submitit's USR2) up to a minute early


def run_stage(stage: Stage, log_file: Path, threads: int | None = None) -> float:
    """Run one `ssvae` command with its output in ``log_file``; return its duration in seconds. ``threads``: its
    OMP_NUM_THREADS (None: the environment's). A fit's run folder left by an interrupted attempt is removed first
    (a fit refuses a folder that holds a run); a test logs into its fit's folder."""
    if stage.args[0] == "fit" and stage.run_dir.exists():
        shutil.rmtree(stage.run_dir)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with log_file.open("w") as log:
        log.write(f"$ {command_line(stage)}\n\n")
        log.flush()
        result = subprocess.run([*SSVAE, *stage.args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise StageFailed(f"{stage.key} failed (exit {result.returncode}):\n  {command_line(stage)}\n"
                          f"(run from {ROOT})\nlog: {log_file}\n--- last lines of the log ---\n{tail}")
    return time.perf_counter() - started


def stage_job(stage: Stage, cache_file: Path, log_file: Path, threads: int | None) -> dict:
    """One job: the stage's `ssvae` command, then its record in ``cache_file`` (a failed stage records nothing)."""
    code = code_version()
    seconds = run_stage(stage, log_file, threads)
    record = finish_record(stage, seconds, log_file, threads, code)
    update_records(cache_file, {stage.key: record})
    return record


def failure_message(job: submitit.Job) -> str | None:
    """Why a finished job failed (its StageFailed's text when it raised one), or None if it did not."""
    error = job.exception()
    if error is None:
        return None
    text = str(error)
    return text.split("StageFailed: ", 1)[1].strip() if "StageFailed: " in text else text.strip()


def stage_threads(jobs: int) -> int | None:
    """The threads of each stage when ``jobs`` stages run at once: this process's cores shared out evenly (None for
    one job at a time, which leaves the environment's OMP_NUM_THREADS alone)."""
    if jobs == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def ready_stages(pending: list[Stage], cache: dict[str, dict]) -> list[Stage]:
    """The stages whose inputs are recorded, tests first (each runs as soon as its fit is done), then in plan order."""
    ready = [stage for stage in pending if all(key in cache for key in stage.needs)]
    return sorted(ready, key=lambda stage: stage.args[0] != "test")


def pending_stages(stages: list[Stage], cache_file: Path, number: dict[str, str]) -> list[Stage]:
    """The stages that ``cache_file`` does not record, after forgetting the recorded fits whose checkpoints are gone
    but which a stage still to run reads (``forget_lost_fits``); a record of another command stops the sweep."""
    cache = load_cache(cache_file)
    lost, readers = forget_lost_fits(stages, cache)
    for key in lost:
        print(f"{key}: recorded as done, but its checkpoint is gone and a stage still to run needs it: runs again",
              flush=True)
    for key in readers:
        print(f"{key}: recorded as done on a fit that runs again: runs again", flush=True)
    if lost:
        update_records(cache_file, {key: None for key in lost + readers})
    pending = []
    for stage in stages:
        if stage.key in cache:
            check_same_command(stage, cache[stage.key], cache_file)
            print(f"{number[stage.key]}  skip (done in {cache[stage.key]['seconds']:.0f} s, recorded in "
                  f"{shown(cache_file)})", flush=True)
        else:
            pending.append(stage)
    return pending


def run_here(stages: list[Stage], cache_file: Path, out: Path, number: dict[str, str], jobs: int = 1,
             deadline: float | None = None) -> None:
    """Run the stages ``stages`` as jobs of submitit's local executor, up to ``jobs`` at once, each once the fits it
    reads are recorded. With a ``deadline`` (time.monotonic()), a stage starts only if ``stage_seconds`` says it
    ends by then (one of no known length starts anyway). After a failure none starts; those running finish and are
    recorded, then the first failure is raised. Ctrl-C stops the running stages (their runs restart next time)."""
    executor = submitit.LocalExecutor(folder=out / "jobs")
    executor.update_parameters(timeout_min=100 * DAY_MINUTES)  # a stage's own max_time ends it
    threads = stage_threads(jobs)
    if threads is not None and stages:
        print(f"{jobs} stages at a time, {threads} thread{'s' * (threads > 1)} each (OMP_NUM_THREADS)", flush=True)
    pending, running, failures = list(stages), {}, []
    try:
        while True:
            for stage, job in [(stage, job) for stage, job in running.items() if job.done()]:
                del running[stage]
                if (failure := failure_message(job)) is not None:
                    print(f"{number[stage.key]}  FAILED", flush=True)
                    failures.append(failure)
                    continue
                record = job.result()
                error = f", test error {record['test_error']:.2f} %" if "test_error" in record else ""
                print(f"{number[stage.key]}  {record['seconds']:.0f} s{error}   log: {record['log']}", flush=True)
            cache = load_cache(cache_file)
            startable = [] if failures else [
                stage for stage in ready_stages(pending, cache) if deadline is None
                or (seconds := stage_seconds(stage)) is None or time.monotonic() + seconds <= deadline
            ][:jobs - len(running)]
            for stage in startable:
                pending.remove(stage)
                running[stage] = executor.submit(stage_job, stage, cache_file, out / "logs" / f"{stage.key}.log",
                                                 threads)
                print(f"{number[stage.key]}  started", flush=True)
            if not running:
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        stop_local(list(running.values()))
        raise StageFailed(f"interrupted: stopped {len(running)} running stage{'s' * (len(running) != 1)}, which "
                          "recorded nothing; rerun the same command to resume from the records.") from None
    if failures:
        raise StageFailed(failures[0])
    if pending:
        print(f"{len(pending)} stage{'s' * (len(pending) > 1)} would not end within --hours: rerun the same command "
              f"to go on in a later sitting", flush=True)


def process_tree(pids: list[int]) -> list[int]:
    """``pids`` and all their descendants, from /proc (``pids`` alone where there is none)."""
    tree, pending = [], list(pids)
    while pending:
        pid = pending.pop()
        tree.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                pending += [int(child) for child in children.read_text().split()]
            except OSError:
                pass
    return tree


def stop_local(jobs: list[submitit.Job], grace: float = 3.0) -> None:
    """Stop local jobs and what they started (their `ssvae` fits): Ctrl-C to each job, then, for whatever is still
    running after ``grace`` seconds (a process may inherit an ignored SIGINT), SIGKILL."""
    tree = process_tree([int(job.job_id) for job in jobs])  # a local job's id is its controller's pid
    for job in jobs:
        job.cancel(check=False)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in tree):
        time.sleep(0.1)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- SLURM -------------------------------------------------------------------------------------------------------


def earlier_jobs(jobs_file: Path, cache: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
    """The stages of this sweep's earlier submissions (``jobs_file``), key -> job id: those whose jobs SLURM still
    holds (pending or running), and those whose jobs have ended without a record in ``cache`` (failed, cancelled,
    or held on a failed input)."""
    submitted = load_cache(jobs_file)
    if not submitted:
        return {}, {}
    listed = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    alive = set(listed.stdout.split()) if listed.returncode == 0 else set(submitted.values())  # unsure: assume held
    queued = {key: job for key, job in submitted.items() if job in alive}
    return queued, {key: job for key, job in submitted.items() if key not in cache and key not in queued}


def submit_to_slurm(stages: list[Stage], cache_file: Path, out: Path, number: dict[str, str],
                    parameters: dict[str, str]) -> list[str]:
    """Submit every stage of ``stages`` not still queued from an earlier submission as a SLURM job, each held until
    the jobs of the fits it reads end well (afterok; cancelled if one fails); return the new job ids. A failed or
    interrupted submission cancels the jobs it had submitted, so that nothing is left half-submitted."""
    if shutil.which("sbatch") is None:
        raise StageFailed("--cluster slurm needs SLURM's sbatch and squeue on PATH (on a cluster's login node); "
                          "without --cluster the sweep runs on this machine.")
    jobs_file = out / "jobs.json"
    queued, lost = earlier_jobs(jobs_file, load_cache(cache_file))
    for key, job in lost.items():
        print(f"{key}: job {job} ended without a record (failed or cancelled; log: {shown(out / 'logs' / key)}.log"
              f", SLURM's: {shown(out / 'jobs')}/{job}_0_log.*): submitted again", flush=True)
    executor = submitit.SlurmExecutor(folder=out / "jobs")
    executor.update_parameters(job_name="ssvae-sweep", additional_parameters={"kill_on_invalid_dep": "yes"})
    executor.update_parameters(**{"cpus_per_task": 1, **parameters})
    threads = executor.parameters.get("cpus_per_task")
    ids: dict[str, str] = {}
    try:
        for stage in stages:
            if stage.key in queued:
                print(f"{number[stage.key]}  still queued as job {queued[stage.key]}", flush=True)
                continue
            after = [ids.get(key) or queued.get(key) for key in stage.needs if key in ids or key in queued]
            seconds = stage_seconds(stage)
            minutes = int(parameters.get("time") or (math.ceil(seconds / 60) if seconds else DAY_MINUTES))
            executor.update_parameters(dependency=f"afterok:{':'.join(after)}" if after else None,
                                       time=max(minutes, MIN_JOB_MINUTES))
            job = executor.submit(stage_job, stage, cache_file, out / "logs" / f"{stage.key}.log", threads)
            ids[stage.key] = job.job_id
            print(f"{number[stage.key]}  job {job.job_id}" + (f" (after {', '.join(after)})" if after else ""),
                  flush=True)
    except (Exception, KeyboardInterrupt) as err:
        if ids:
            subprocess.run(["scancel", *ids.values()], capture_output=True)
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else \
            f"failed ({(str(err).strip().splitlines() or [type(err).__name__])[-1][-300:]})"
        raise StageFailed(f"submission {why}: cancelled the {len(ids)} job{'s' * (len(ids) != 1)} it had "
                          "submitted; nothing of it is queued. Rerun the same command to submit again.") from None
    write_json(jobs_file, {**load_cache(jobs_file), **ids})
    return list(ids.values())
