"""One module per command of `course-transformer`; each has `main(argv) -> int` and its own parser."""
