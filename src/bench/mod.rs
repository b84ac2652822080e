//! `duet bench`: measurements and device checks that need a GPU (run on the device machine).

pub mod check;
pub mod kernels;
