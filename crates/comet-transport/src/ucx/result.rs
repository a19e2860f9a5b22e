//! UCS statuses as values: their text, and the library version.

use super::sys;
use std::ffi::{c_char, c_int, c_uint, CStr};

/// The text UCX gives status `st` (`"status N"` when it has none).
pub fn status_string(st: c_int) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated
    // string for every status value, known or not.
    let p: *const c_char = unsafe { sys::cx_status_string(st) };
    if p.is_null() {
        return format!("status {st}");
    }
    // SAFETY: non-null, static and NUL-terminated (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The UCX library version this process runs with (major, minor, release).
pub fn version() -> (u32, u32, u32) {
    let (mut a, mut b, mut c): (c_uint, c_uint, c_uint) = (0, 0, 0);
    // SAFETY: writes three unsigned ints through valid pointers.
    unsafe { sys::cx_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}
