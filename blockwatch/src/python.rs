//! CPython interpreter frames (being written).
