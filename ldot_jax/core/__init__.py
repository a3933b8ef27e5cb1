"""Layer 1, core: files and paths (fileutil), devices, meshes and the distributed start
(parallel), the run-directory layout (workdir) and small array helpers (numerics)."""
