//! The C layer over UCP (src/ucx/shim.c, built by build.rs): its
//! declarations and the UCS status values the Rust side tests for. Nothing
//! else; `result` turns statuses into text, `safe` wraps these calls in
//! handles, and the transport calls those.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `UCS_OK`.
pub const UCS_OK: c_int = 0;
/// `UCS_INPROGRESS`: the operation continues as a request.
pub const UCS_INPROGRESS: c_int = 1;
/// `UCS_ERR_NO_MEMORY`.
pub const UCS_ERR_NO_MEMORY: c_int = -4;
/// `UCS_ERR_INVALID_PARAM`.
pub const UCS_ERR_INVALID_PARAM: c_int = -5;
/// `UCS_ERR_UNREACHABLE`: no transport reaches the peer (with the asked
/// error handling).
pub const UCS_ERR_UNREACHABLE: c_int = -6;
/// `UCS_ERR_NOT_CONNECTED`, `UCS_ERR_CONNECTION_RESET`,
/// `UCS_ERR_ENDPOINT_TIMEOUT`: the peer's endpoint failed.
pub const UCS_ERR_NOT_CONNECTED: c_int = -24;
pub const UCS_ERR_CONNECTION_RESET: c_int = -25;
pub const UCS_ERR_ENDPOINT_TIMEOUT: c_int = -80;

// Each function is the UCP call its name says, in src/ucx/shim.c; the
// parameter structs are filled there against the installed headers.
extern "C" {
    pub fn cx_version(major: *mut c_uint, minor: *mut c_uint, release: *mut c_uint);
    pub fn cx_status_string(status: c_int) -> *const c_char;
    pub fn cx_init(
        mods: *const *const c_char,
        n: c_int,
        refused: *mut u64,
        ctx: *mut *mut c_void,
        worker: *mut *mut c_void,
    ) -> c_int;
    pub fn cx_fini(ctx: *mut c_void, worker: *mut c_void);
    pub fn cx_worker_address(worker: *mut c_void, addr: *mut *mut c_void, len: *mut usize)
        -> c_int;
    pub fn cx_worker_release_address(worker: *mut c_void, addr: *mut c_void);
    pub fn cx_progress(worker: *mut c_void) -> c_uint;
    pub fn cx_ep_create(
        worker: *mut c_void,
        addr: *const c_void,
        peer_errors: c_int,
        err_flag: *mut i32,
        ep: *mut *mut c_void,
    ) -> c_int;
    pub fn cx_ep_close(ep: *mut c_void, force: c_int, req: *mut *mut c_void) -> c_int;
    pub fn cx_mem_alloc(
        ctx: *mut c_void,
        len: usize,
        memh: *mut *mut c_void,
        addr: *mut *mut c_void,
        len_out: *mut usize,
    ) -> c_int;
    pub fn cx_mem_unmap(ctx: *mut c_void, memh: *mut c_void) -> c_int;
    pub fn cx_rkey_pack(
        ctx: *mut c_void,
        memh: *mut c_void,
        buf: *mut *mut c_void,
        len: *mut usize,
    ) -> c_int;
    pub fn cx_rkey_buffer_release(buf: *mut c_void);
    pub fn cx_rkey_unpack(ep: *mut c_void, buf: *const c_void, rkey: *mut *mut c_void) -> c_int;
    pub fn cx_rkey_destroy(rkey: *mut c_void);
    pub fn cx_put(
        ep: *mut c_void,
        buf: *const c_void,
        len: usize,
        raddr: u64,
        rkey: *mut c_void,
        req: *mut *mut c_void,
    ) -> c_int;
    pub fn cx_atomic64(
        ep: *mut c_void,
        op: c_int,
        value: *mut u64,
        reply: *mut u64,
        raddr: u64,
        rkey: *mut c_void,
        req: *mut *mut c_void,
    ) -> c_int;
    pub fn cx_ep_flush(ep: *mut c_void, req: *mut *mut c_void) -> c_int;
    pub fn cx_worker_flush(worker: *mut c_void, req: *mut *mut c_void) -> c_int;
    pub fn cx_worker_fence(worker: *mut c_void) -> c_int;
    pub fn cx_req_check(req: *mut c_void) -> c_int;
    pub fn cx_req_free(req: *mut c_void);
}
