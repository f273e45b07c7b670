#![no_std]

// Lets blockwatch name this crate as a build-dependency, so cargo rebuilds
// the user-space binary when the kernel programs change.
