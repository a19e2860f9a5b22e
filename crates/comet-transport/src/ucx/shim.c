/*
 * comet-rs: a thin C layer over UCP for the `ucx` transport.
 *
 * UCP's parameter structs (ucp_params_t, ucp_ep_params_t, ...) change size
 * and layout between UCX releases; filling them here, compiled against the
 * installed headers, keeps the Rust side free of hand-copied layouts. Every
 * function takes and returns plain scalars and opaque pointers. Non-blocking
 * operations return UCS_OK (done at once), UCS_INPROGRESS with *req set
 * (poll with cx_req_check, release with cx_req_free), or an error status.
 */
#include <string.h>
#include <stdint.h>
#include <ucp/api/ucp.h>

static int cx_from_ptr(ucs_status_ptr_t p, void **req) {
    *req = NULL;
    if (p == NULL) return UCS_OK;
    if (UCS_PTR_IS_ERR(p)) return UCS_PTR_STATUS(p);
    *req = p;
    return UCS_INPROGRESS;
}

void cx_version(unsigned *major, unsigned *minor, unsigned *release) {
    ucp_get_version(major, minor, release);
}

const char *cx_status_string(int status) { return ucs_status_string((ucs_status_t)status); }

/* `mods` holds `n` pairs of (name without UCX_, value) applied over the
   environment's configuration; bit i of *refused is set where UCX refused
   pair i (left as the environment says: a tuning, not a requirement). */
int cx_init(const char *const *mods, int n, unsigned long long *refused, void **ctx_out,
            void **worker_out) {
    ucp_config_t *config = NULL;
    ucp_params_t params;
    ucp_worker_params_t wparams;
    ucp_context_h ctx = NULL;
    ucp_worker_h worker = NULL;
    ucs_status_t st;

    *ctx_out = NULL;
    *worker_out = NULL;
    st = ucp_config_read(NULL, NULL, &config);
    if (st != UCS_OK) return st;
    *refused = 0;
    for (int i = 0; i < n && i < 64; ++i) {
        if (ucp_config_modify(config, mods[2 * i], mods[2 * i + 1]) != UCS_OK) *refused |= 1ull << i;
    }
    memset(&params, 0, sizeof(params));
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AMO64;
    st = ucp_init(&params, config, &ctx);
    ucp_config_release(config);
    if (st != UCS_OK) return st;
    memset(&wparams, 0, sizeof(wparams));
    /* The Rust side serialises every call on a worker behind a mutex. */
    wparams.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wparams.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    st = ucp_worker_create(ctx, &wparams, &worker);
    if (st != UCS_OK) {
        ucp_cleanup(ctx);
        return st;
    }
    *ctx_out = ctx;
    *worker_out = worker;
    return UCS_OK;
}

void cx_fini(void *ctx, void *worker) {
    if (worker) ucp_worker_destroy((ucp_worker_h)worker);
    if (ctx) ucp_cleanup((ucp_context_h)ctx);
}

int cx_worker_address(void *worker, void **addr, size_t *len) {
    return ucp_worker_get_address((ucp_worker_h)worker, (ucp_address_t **)addr, len);
}

void cx_worker_release_address(void *worker, void *addr) {
    ucp_worker_release_address((ucp_worker_h)worker, (ucp_address_t *)addr);
}

unsigned cx_progress(void *worker) { return ucp_worker_progress((ucp_worker_h)worker); }

static void cx_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)ep;
    /* Read by the Rust side under the worker lock, after progress. */
    *(int32_t *)arg = (int32_t)status;
}

/* peer_errors: ask UCX to report a failed peer (UCP_ERR_HANDLING_MODE_PEER);
 * shared-memory transports of UCX 1.13 cannot, and refuse such endpoints. */
int cx_ep_create(void *worker, const void *addr, int peer_errors, int32_t *err_flag, void **ep_out) {
    ucp_ep_params_t p;
    memset(&p, 0, sizeof(p));
    p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                   UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.address = (const ucp_address_t *)addr;
    p.err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    p.err_handler.cb = cx_ep_error;
    p.err_handler.arg = err_flag;
    return ucp_ep_create((ucp_worker_h)worker, &p, (ucp_ep_h *)ep_out);
}

int cx_ep_close(void *ep, int force, void **req) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    return cx_from_ptr(ucp_ep_close_nbx((ucp_ep_h)ep, &p), req);
}

/* UCX allocates `len` bytes and maps them; *addr and *len_out say where and
   how many. Memory UCX allocates (from a shared-memory segment where its
   transports offer one) is what peers on the host can reach by a plain
   copy; memory registered by address is reached only through active
   messages there (an 8 KiB copy at a time, progressed by the receiver). */
int cx_mem_alloc(void *ctx, size_t len, void **memh, void **addr, size_t *len_out) {
    ucp_mem_map_params_t p;
    ucp_mem_attr_t a;
    int st;
    memset(&p, 0, sizeof(p));
    p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    p.address = NULL;
    p.length = len;
    p.flags = UCP_MEM_MAP_ALLOCATE;
    st = ucp_mem_map((ucp_context_h)ctx, &p, (ucp_mem_h *)memh);
    if (st != UCS_OK) return st;
    memset(&a, 0, sizeof(a));
    a.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    st = ucp_mem_query((ucp_mem_h)*memh, &a);
    if (st != UCS_OK) {
        ucp_mem_unmap((ucp_context_h)ctx, (ucp_mem_h)*memh);
        *memh = NULL;
        return st;
    }
    *addr = a.address;
    *len_out = a.length;
    return UCS_OK;
}

int cx_mem_unmap(void *ctx, void *memh) { return ucp_mem_unmap((ucp_context_h)ctx, (ucp_mem_h)memh); }

int cx_rkey_pack(void *ctx, void *memh, void **buf, size_t *len) {
    return ucp_rkey_pack((ucp_context_h)ctx, (ucp_mem_h)memh, buf, len);
}

void cx_rkey_buffer_release(void *buf) { ucp_rkey_buffer_release(buf); }

int cx_rkey_unpack(void *ep, const void *buf, void **rkey) {
    return ucp_ep_rkey_unpack((ucp_ep_h)ep, buf, (ucp_rkey_h *)rkey);
}

void cx_rkey_destroy(void *rkey) { ucp_rkey_destroy((ucp_rkey_h)rkey); }

int cx_put(void *ep, const void *buf, size_t len, uint64_t raddr, void *rkey, void **req) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    return cx_from_ptr(ucp_put_nbx((ucp_ep_h)ep, buf, len, raddr, (ucp_rkey_h)rkey, &p), req);
}

/* op 0: add `*value` to the remote word; op 1: store `*value` (swap, old value into *reply). */
int cx_atomic64(void *ep, int op, uint64_t *value, uint64_t *reply, uint64_t raddr, void *rkey, void **req) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = ucp_dt_make_contig(8);
    if (op == 1) {
        p.op_attr_mask |= UCP_OP_ATTR_FIELD_REPLY_BUFFER;
        p.reply_buffer = reply;
    }
    return cx_from_ptr(ucp_atomic_op_nbx((ucp_ep_h)ep, op == 1 ? UCP_ATOMIC_OP_SWAP : UCP_ATOMIC_OP_ADD, value, 1, raddr,
                                         (ucp_rkey_h)rkey, &p),
                       req);
}

int cx_ep_flush(void *ep, void **req) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    return cx_from_ptr(ucp_ep_flush_nbx((ucp_ep_h)ep, &p), req);
}

int cx_worker_flush(void *worker, void **req) {
    ucp_request_param_t p;
    memset(&p, 0, sizeof(p));
    return cx_from_ptr(ucp_worker_flush_nbx((ucp_worker_h)worker, &p), req);
}

int cx_worker_fence(void *worker) { return ucp_worker_fence((ucp_worker_h)worker); }

int cx_req_check(void *req) { return ucp_request_check_status(req); }

void cx_req_free(void *req) { ucp_request_free(req); }
