//! GPUs for containers: CDI specs, or the device nodes and driver files.
