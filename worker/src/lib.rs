//! The GPU Streaming worker: the inference engine a GPU owner runs (built in the worker issue).
