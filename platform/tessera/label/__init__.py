"""Teacher labelling: a model on an OpenAI-compatible endpoint labels the rows a job's dataset leaves
unlabelled, before prepare (`spec.dataset.teacher`; the Argo template's and `tessera run`'s label step).

    manifest = label_job(job)          # writes jobs/<ns>/<job>/labelled/{data.jsonl,rejected.json,manifest.json}

`client` speaks to the endpoint (bounded retries, early checks), `labeller` turns rows into
voted labels through the store cache, `step` is the job's step.
"""

from tessera.label.client import API_KEY_ENV, TeacherError, TeacherRefusedError
from tessera.label.labeller import RowLabel, TeacherCache, label_records, render_prompt, teacher_identity
from tessera.label.step import label_job, labelled_manifest

__all__ = [
    "API_KEY_ENV",
    "RowLabel",
    "TeacherCache",
    "TeacherError",
    "TeacherRefusedError",
    "label_job",
    "label_records",
    "labelled_manifest",
    "render_prompt",
    "teacher_identity",
]
