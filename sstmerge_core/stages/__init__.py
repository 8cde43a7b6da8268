"""The stages of a merge job, each a function from typed inputs to a frozen result, in the order they run:

- `inputs.load_inputs`: adapters, data sets, evaluation sets and the base model → `LoadedInputs`
- `fisher.compute_fisher`: both restricted K-FAC passes, through the factor cache → `FisherResult`
- `merging.merge_updates`: one method on every module for every α, in memory → `MergedUpdates`
- `writing.write_adapter_weights`: PEFT folders of the merged updates → `WrittenAdapters`
- `evaluation.evaluate_adapters`: safety, over-refusal and utility of every model → `EvaluationResult`
  (`evaluation.score_updates` scores merged updates held in memory, for a search over parameters)
- `documents.write_documents`: metrics, plot, model cards, `merge_spec.json` and `merge_report.json`

`sstmerge_core.pipeline.run_merge` runs them in that order; a search loop loads once, computes the Fisher
factors once, then calls `merge_updates` and `score_updates` for each candidate without touching the disk.
"""
