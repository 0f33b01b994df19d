"""The benchmark scripts. Each runs as a file from the repository root
(``python benchmarks/<name>.py``) and imports as a module of this package
(``from benchmarks import bench_serving_cpu``), as the tests do."""
