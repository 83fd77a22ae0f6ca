"""nbgrader plugins for the course (``build/assignments/nbgrader_config.py`` names them).

* :class:`ExecuteExercises` — autograde runs only the cells grading needs: the locked setup cell
  (``import coursekit as ck``), the exercise (solution) cells and the locked check cells. The course notebooks
  train models for minutes; their exercises are self-contained, so grading a notebook takes seconds.
  ``run_all = True`` runs every cell, as plain nbgrader does.
* :class:`ExerciseCsvExporter` — ``nbgrader export`` writes one row per student and exercise:
  ``student_id, assignment, exercise, title, score, max_score, status`` (status: passed / failed / not submitted).
"""
from __future__ import annotations

import csv
import re

from nbgrader.api import MissingEntry
from nbgrader.converters.autograde import Autograde
from nbgrader.plugins.export import ExportPlugin
from nbgrader.preprocessors import Execute
from traitlets import Bool

from .assignments import HEADER


def _graded(cell) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return bool(meta.get("solution") or meta.get("grade") or meta.get("locked"))


class ExecuteExercises(Execute):
    """nbgrader's Execute, restricted to setup, solution and check cells unless ``run_all``."""

    run_all = Bool(False, help="Run every code cell of a submission (slow for the course notebooks)").tag(config=True)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and not self.run_all and not _graded(cell):
            return cell, resources
        return super().preprocess_cell(cell, resources, index)


AUTOGRADE_PREPROCESSORS = [ExecuteExercises if p is Execute else p
                           for p in Autograde.class_traits()["autograde_preprocessors"].default()]


def _exercise(grade_id: str) -> str:
    m = re.fullmatch(r"check_(\d+)_(\w+)", grade_id)
    return f"{m.group(1)}.{m.group(2)}" if m else grade_id


class ExerciseCsvExporter(ExportPlugin):
    """One CSV row per (student, exercise) with nbgrader's autograded score."""

    FIELDS = ["student_id", "assignment", "exercise", "title", "score", "max_score", "status"]

    def rows(self, gradebook) -> list[dict]:
        students = [str(s) for s in self.student] or [s.id for s in gradebook.students]
        wanted = [str(a) for a in self.assignment]
        out = []
        for assignment in gradebook.assignments:
            if wanted and assignment.name not in wanted:
                continue
            for notebook in assignment.notebooks:
                cells = sorted(notebook.grade_cells, key=lambda g: g.name)
                titles = {}
                for gc in cells:
                    try:
                        src = gradebook.find_source_cell(gc.name.replace("check_", "ex_", 1), notebook.name,
                                                         assignment.name).source
                        m = HEADER.search(src)
                        titles[gc.name] = m["title"].strip() if m else ""
                    except MissingEntry:
                        titles[gc.name] = ""
                for sid in students:
                    for gc in cells:
                        row = {"student_id": sid, "assignment": assignment.name, "exercise": _exercise(gc.name),
                               "title": titles[gc.name], "max_score": gc.max_score}
                        try:
                            g = gradebook.find_grade(gc.name, notebook.name, assignment.name, sid)
                            score = float(g.score or 0.0)
                            row.update(score=score, status="passed" if score >= gc.max_score else "failed")
                        except MissingEntry:
                            row.update(score=0.0, status="not submitted")
                        out.append(row)
        return out

    def export(self, gradebook) -> None:
        dest = self.to or "grades.csv"
        rows = self.rows(gradebook)
        with open(dest, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:g}" if isinstance(v, float) else v) for k, v in r.items()})
        self.log.info("Exported %d rows (student x exercise) to %s", len(rows), dest)
