"""Run mteb 2 on Hub tasks and on local BEIR folders, writing mteb's result files where asked.

A local BEIR folder becomes an mteb retrieval task of its own (`local_retrieval_task`): read and
checked by `embedforge.eval.beir.load_beir`, named after the folder, its dataset revision the
fingerprint of its files, so nothing is fetched from the Hub. mteb scores it with its own
evaluator (pytrec_eval).

Results go to `output_folder` in mteb's own cache layout
(`results/<model>/<revision>/[experiments/<settings>/]<task>.json`). Local tasks are always
recomputed (a folder's content can change under the same name); Hub tasks, pinned by their
dataset revision, reuse a finished result of the same model revision and settings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedforge.errors import ConfigError
from embedforge.eval.beir import fingerprint, load_beir
from embedforge.eval.mteb_adapter import MtebEncoder, import_mteb


def local_retrieval_task(folder: str | os.PathLike, split: str = "test", language: str = "eng-Latn",
                         name: str | None = None) -> Any:
    """An mteb `AbsTaskRetrieval` over a local BEIR folder (main score nDCG@10)."""
    import_mteb()
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    root = Path(folder)
    data = load_beir(root, split=split)
    metadata = TaskMetadata(
        name=name or root.resolve().name, description=f"Local BEIR folder {root}",
        dataset={"path": str(root.resolve()), "revision": fingerprint(root, split)},
        type="Retrieval", category="t2t", modalities=["text"], eval_splits=[split], eval_langs=[language],
        main_score="ndcg_at_10",
    )

    class LocalRetrieval(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {"default": {split: {
                "corpus": Dataset.from_dict({"id": list(data.corpus), "text": list(data.corpus.values())}),
                "queries": Dataset.from_dict({"id": list(data.queries), "text": list(data.queries.values())}),
                "relevant_docs": {q: dict(judged) for q, judged in data.qrels.items()},
                "top_ranked": None,
            }}}
            self.data_loaded = True

    LocalRetrieval.metadata = metadata
    return LocalRetrieval()


def run_mteb(encoder: MtebEncoder, tasks: Sequence[str], output_folder: str | os.PathLike, *,
             split: str = "test", show_progress: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate `encoder` on mteb task names and/or local BEIR folders.

    Returns {task name: {"main_score", "scores" (mteb's per split), "result_file"}}.
    """
    mteb = import_mteb()
    folders = [t for t in tasks if Path(t).is_dir()]
    names = [t for t in tasks if not Path(t).is_dir()]
    hub_tasks = []
    if names:
        try:
            hub_tasks = list(mteb.get_tasks(tasks=names))
        except KeyError as exc:
            raise ConfigError(f"mteb: {exc.args[0] if exc.args else exc} (and no folder of that name)") from None
    cache = mteb.ResultCache(cache_path=Path(output_folder))
    settings = {"cache": cache, "show_progress_bar": show_progress,
                "encode_kwargs": {"batch_size": encoder.batch_size, "show_progress_bar": show_progress}}
    results = []
    if folders:
        local = [local_retrieval_task(f, split=split) for f in folders]
        results += mteb.evaluate(encoder, tasks=local, overwrite_strategy="always", **settings).task_results
    if hub_tasks:
        results += mteb.evaluate(encoder, tasks=hub_tasks, overwrite_strategy="only-missing", **settings).task_results
    meta = encoder.mteb_model_meta
    return {
        r.task_name: {
            "main_score": float(r.get_score()),
            "scores": r.to_dict()["scores"],
            "result_file": str(cache.get_task_result_path(r.task_name, meta)),
        }
        for r in results
    }
