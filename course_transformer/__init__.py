"""The tools that act on the course Transformer, layered above the model family in `modeling/`.

    course_transformer.cli        the `course-transformer` command line (top)
    course_transformer.commands   data, tokenizers, training, generation, evaluation, plots, benchmarks, publishing
    evaluation                    the harness: parity, attention analysis, LM quality, benchmarks (a package beside)
    course_transformer.core       what every layer above needs on saved models: atomic writes, safe loading,
                                  conversion to and from BERT / GPT-2
    modeling                      the model family and what a Hub folder carries (bottom)

Each layer imports only the layers below it; `make test` checks the contract with import-linter.
"""
