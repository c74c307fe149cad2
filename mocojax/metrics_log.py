"""metrics.jsonl: one JSON row per logged step, next to the TensorBoard events.

A resumed run continues from its last checkpoint, so the rows a killed run wrote after that
checkpoint would be written again. `MetricsLog(..., resume_step=s)` first drops every row
after step s (rewriting the file through a temporary one, so a crash leaves the old file or the
new one), which keeps each step once after any number of resumes.
"""

import json
import os


class MetricsLog:

  def __init__(self, path: str, resume_step: int = 0, enabled: bool = True):
    self.path, self.enabled = path, enabled
    if enabled and os.path.exists(path):
      self._drop_after(resume_step)

  def _drop_after(self, step: int):
    with open(self.path) as f:
      lines = f.readlines()
    kept = [json.dumps(row) + '\n' for row in _parse(lines) if row.get('step', 0) <= step]
    if len(kept) == len(lines):
      return
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict):
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}}) + '\n')


def _parse(lines):
  for line in lines:
    try:
      yield json.loads(line)
    except ValueError:
      continue  # a line cut short by a kill (or a blank one)


def read_rows(path: str) -> list:
  """The rows of a metrics.jsonl in order; [] if it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(_parse(f))
