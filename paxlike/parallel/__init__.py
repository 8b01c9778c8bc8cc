"""Device meshes, logical-axis rules, multi-process set-up, and compiling and measuring layouts."""
