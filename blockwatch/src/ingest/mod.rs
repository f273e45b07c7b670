//! Records from the kernel's ring buffer, decoded into typed records.

pub mod decode;
