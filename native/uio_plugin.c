// uio_plugin: capture of per-layer activations and KV-cache writes for uio-gguf (see uio_plugin.h).
// Uses only the public llama.h / ggml.h / ggml-backend.h API; the one llama.cpp internal it relies on,
// the sequence-state blob format, is verified at run time by uio_kv_probe.
#include "uio_plugin.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define UIO_STATE_MAGIC 0xaf143cd8u

static _Thread_local char g_error[512];

static int32_t fail(int32_t code, const char * fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(g_error, sizeof(g_error), fmt, args);
    va_end(args);
    return code;
}

const char * uio_last_error(void) {
    return g_error;
}

int32_t uio_plugin_version(void) {
    return UIO_PLUGIN_VERSION;
}

//
// Capture
//

static const char * const KIND_PREFIX[3] = {"attn_norm-", "Kcur-", "Vcur-"};

struct uio_capture {
    int32_t   n_layer;
    int32_t   width[3];   // per kind
    int32_t   max_rows;
    float   * rows[3];    // per kind: [n_layer][max_rows][width]
    bool    * seen[3];    // per kind: [n_layer]
    bool      armed;
    int32_t   n_rows;
    int32_t   n_graphs;   // graphs evaluated since arm (counted at attn_norm-0)
    int32_t   status;     // first error since arm, or UIO_OK
    char      message[256];
    uint8_t * raw;        // staging for nodes that are not float32
    size_t    raw_size;
};

static void capture_error(uio_capture * cap, int32_t code, const char * fmt, ...) {
    if (cap->status != UIO_OK) {
        return;  // keep the first error: later ones are usually its consequences
    }
    cap->status = code;
    va_list args;
    va_start(args, fmt);
    vsnprintf(cap->message, sizeof(cap->message), fmt, args);
    va_end(args);
}

uio_capture * uio_capture_new(int32_t n_layer, int32_t n_embd, int32_t n_embd_k_gqa, int32_t n_embd_v_gqa, int32_t max_rows) {
    if (n_layer <= 0 || n_embd <= 0 || n_embd_k_gqa <= 0 || n_embd_v_gqa <= 0 || max_rows <= 0) {
        fail(UIO_ERR_ARG, "uio_capture_new: every size must be positive");
        return NULL;
    }
    uio_capture * cap = calloc(1, sizeof(*cap));
    if (!cap) {
        return NULL;
    }
    cap->n_layer  = n_layer;
    cap->width[0] = n_embd;
    cap->width[1] = n_embd_k_gqa;
    cap->width[2] = n_embd_v_gqa;
    cap->max_rows = max_rows;
    for (int kind = 0; kind < 3; kind++) {
        cap->rows[kind] = calloc((size_t) n_layer * max_rows * cap->width[kind], sizeof(float));
        cap->seen[kind] = calloc((size_t) n_layer, sizeof(bool));
        if (!cap->rows[kind] || !cap->seen[kind]) {
            uio_capture_free(cap);
            fail(UIO_ERR_NOMEM, "uio_capture_new: out of memory");
            return NULL;
        }
    }
    cap->status = UIO_ERR_NOT_CAPTURED;
    snprintf(cap->message, sizeof(cap->message), "nothing captured yet: arm the capture before the decode");
    return cap;
}

void uio_capture_free(uio_capture * cap) {
    if (!cap) {
        return;
    }
    for (int kind = 0; kind < 3; kind++) {
        free(cap->rows[kind]);
        free(cap->seen[kind]);
    }
    free(cap->raw);
    free(cap);
}

void uio_capture_arm(uio_capture * cap, int32_t n_rows) {
    if (!cap) {
        return;
    }
    for (int kind = 0; kind < 3; kind++) {
        memset(cap->seen[kind], 0, (size_t) cap->n_layer * sizeof(bool));
    }
    cap->n_graphs   = 0;
    cap->status     = UIO_OK;
    cap->message[0] = '\0';
    if (n_rows <= 0 || n_rows > cap->max_rows) {
        cap->armed  = false;
        cap->n_rows = 0;
        capture_error(cap, UIO_ERR_ARG, "uio_capture_arm: n_rows %d is outside [1, %d]", n_rows, cap->max_rows);
        return;
    }
    cap->armed  = true;
    cap->n_rows = n_rows;
}

void uio_capture_disarm(uio_capture * cap) {
    if (cap) {
        cap->armed = false;
    }
}

// "attn_norm-12" -> kind 0, layer 12. Anything else (other names, suffixes) -> false.
static bool parse_node_name(const char * name, int32_t * kind, int32_t * layer) {
    for (int k = 0; k < 3; k++) {
        const size_t len = strlen(KIND_PREFIX[k]);
        if (strncmp(name, KIND_PREFIX[k], len) != 0) {
            continue;
        }
        const char * p = name + len;
        if (*p < '0' || *p > '9') {
            return false;
        }
        int32_t value = 0;
        for (; *p >= '0' && *p <= '9'; p++) {
            if (value > 100000) {
                return false;
            }
            value = value * 10 + (*p - '0');
        }
        if (*p != '\0') {
            return false;
        }
        *kind  = k;
        *layer = value;
        return true;
    }
    return false;
}

// Kcur-L / Vcur-L name several nodes (matmul, bias add, reshape, and for K the RoPE); every one but
// the RoPE is wanted, and the last of them in graph order holds the final pre-RoPE values.
static bool node_wanted(const uio_capture * cap, const struct ggml_tensor * t, int32_t * kind, int32_t * layer) {
    if (!cap->armed || !parse_node_name(t->name, kind, layer) || *layer >= cap->n_layer) {
        return false;
    }
    return *kind == UIO_KIND_ATTN_NORM || t->op != GGML_OP_ROPE;
}

// The leading dims of t multiply to `width` (one row), the next dim counts the tokens, the rest are 1.
// Returns that token dim (GGML_MAX_DIMS when there is none, i.e. one token), or -1 for another shape.
static int token_dim(const struct ggml_tensor * t, int64_t width) {
    int64_t w = 1;
    int d = 0;
    while (d < GGML_MAX_DIMS && w < width) {
        w *= t->ne[d++];
    }
    if (w != width) {
        return -1;
    }
    for (int i = d + 1; i < GGML_MAX_DIMS; i++) {
        if (t->ne[i] != 1) {
            return -1;
        }
    }
    return d;
}

static bool rows_are_dense(const struct ggml_tensor * t, int dim) {
    size_t expect = ggml_type_size(t->type);
    for (int i = 0; i < dim; i++) {
        if (t->nb[i] != expect) {
            return false;
        }
        expect *= (size_t) t->ne[i];
    }
    return true;
}

// Copies n_rows rows of `width` elements (token stride nb[dim]) from a device or host tensor into dst.
static void copy_rows(const struct ggml_tensor * t, int dim, int32_t n_rows, int64_t width, uint8_t * dst) {
    const size_t ts         = ggml_type_size(t->type);
    const size_t row_bytes  = (size_t) width * ts;
    const size_t tok_stride = dim < GGML_MAX_DIMS ? t->nb[dim] : 0;
    if (rows_are_dense(t, dim)) {
        ggml_backend_tensor_get_2d(t, dst, 0, row_bytes, n_rows, tok_stride, row_bytes);
        return;
    }
    // a view with padded inner strides: one strided copy per run of ne[0] elements
    const int64_t n_runs = width / t->ne[0];
    for (int64_t r = 0; r < n_runs; r++) {
        size_t  offset = 0;
        int64_t rest   = r;
        for (int i = 1; i < dim; i++) {
            offset += (size_t) (rest % t->ne[i]) * t->nb[i];
            rest /= t->ne[i];
        }
        ggml_backend_tensor_get_2d(t, dst + (size_t) r * t->ne[0] * ts, offset, (size_t) t->ne[0] * ts, n_rows, tok_stride, row_bytes);
    }
}

static bool ensure_raw(uio_capture * cap, size_t size) {
    if (cap->raw_size >= size) {
        return true;
    }
    uint8_t * raw = realloc(cap->raw, size);
    if (!raw) {
        return false;
    }
    cap->raw      = raw;
    cap->raw_size = size;
    return true;
}

static void capture_node(uio_capture * cap, const struct ggml_tensor * t, int32_t kind, int32_t layer) {
    if (kind == UIO_KIND_ATTN_NORM && layer == 0 && ++cap->n_graphs > 1) {
        capture_error(cap, UIO_ERR_CAPTURE, "a second graph ran while armed: the batch was split into ubatches "
                      "(n_ubatch must be >= %d) or more than one decode ran", cap->n_rows);
        return;
    }
    const int64_t width = cap->width[kind];
    const int dim = token_dim(t, width);
    if (dim < 0) {
        capture_error(cap, UIO_ERR_CAPTURE, "node %s has shape [%lld, %lld, %lld, %lld], not rows of %lld", t->name,
                      (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3], (long long) width);
        return;
    }
    const int64_t n_tokens = dim < GGML_MAX_DIMS ? t->ne[dim] : 1;
    if (n_tokens != cap->n_rows) {
        capture_error(cap, UIO_ERR_CAPTURE, "node %s has %lld rows, the capture was armed for %d: the batch was split into ubatches "
                      "(n_ubatch must be >= the armed rows) or another decode ran",
                      t->name, (long long) n_tokens, cap->n_rows);
        return;
    }
    const struct ggml_type_traits * traits = ggml_get_type_traits(t->type);
    if (traits->is_quantized || (t->type != GGML_TYPE_F32 && !traits->to_float) || t->nb[0] != ggml_type_size(t->type)) {
        capture_error(cap, UIO_ERR_TYPE, "node %s has type %s and element stride %zu: cannot read it as float rows",
                      t->name, ggml_type_name(t->type), t->nb[0]);
        return;
    }
    const struct ggml_backend_buffer * buf = t->view_src ? t->view_src->buffer : t->buffer;
    if (!buf || !t->data) {
        capture_error(cap, UIO_ERR_CAPTURE, "node %s has no allocated data", t->name);
        return;
    }
    float * dst = cap->rows[kind] + (size_t) layer * cap->max_rows * width;
    if (t->type == GGML_TYPE_F32) {
        copy_rows(t, dim, cap->n_rows, width, (uint8_t *) dst);
    } else {
        if (!ensure_raw(cap, (size_t) cap->n_rows * width * ggml_type_size(t->type))) {
            capture_error(cap, UIO_ERR_NOMEM, "out of memory reading node %s", t->name);
            return;
        }
        copy_rows(t, dim, cap->n_rows, width, cap->raw);
        traits->to_float(cap->raw, dst, (int64_t) cap->n_rows * width);
    }
    cap->seen[kind][layer] = true;
}

bool uio_capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    uio_capture * cap = user_data;
    int32_t kind, layer;
    if (!cap || !node_wanted(cap, t, &kind, &layer)) {
        return !ask;  // ask: "not needed"; otherwise keep computing (false would abort the graph)
    }
    if (!ask) {
        capture_node(cap, t, kind, layer);
    }
    return true;
}

// The first missing node, described in `message`; false when every layer was captured.
static bool find_missing(const uio_capture * cap, char * message, size_t size) {
    for (int32_t layer = 0; layer < cap->n_layer; layer++) {
        for (int kind = 0; kind < 3; kind++) {
            if (!cap->seen[kind][layer]) {
                snprintf(message, size, "node %s%d was not seen in the decode (no decode ran while armed, "
                         "or this architecture names its nodes differently)", KIND_PREFIX[kind], layer);
                return true;
            }
        }
    }
    return false;
}

int32_t uio_capture_status(const uio_capture * cap) {
    if (!cap) {
        return UIO_ERR_ARG;
    }
    if (cap->status != UIO_OK) {
        return cap->status;
    }
    char message[sizeof(cap->message)];
    return find_missing(cap, message, sizeof(message)) ? UIO_ERR_NOT_CAPTURED : UIO_OK;
}

const char * uio_capture_error_message(const uio_capture * cap) {
    if (!cap) {
        return "null capture";
    }
    if (cap->status != UIO_OK) {
        return cap->message;
    }
    // an error found after the decode is described into the capture, but not recorded in its status:
    // the nodes may still arrive (status asked before the decode)
    uio_capture * mut = (uio_capture *) cap;
    return find_missing(cap, mut->message, sizeof(mut->message)) ? mut->message : "";
}

int32_t uio_capture_n_rows(const uio_capture * cap) {
    return cap ? cap->n_rows : 0;
}

const float * uio_capture_rows(const uio_capture * cap, int32_t kind, int32_t layer) {
    if (!cap || kind < 0 || kind > 2 || layer < 0 || layer >= cap->n_layer) {
        return NULL;
    }
    return cap->rows[kind] + (size_t) layer * cap->max_rows * cap->width[kind];
}

//
// The sequence-state blob (llama_state_seq_get_data / set_data, one stream, one sequence per cell):
//   u32 magic, i32 seq_id, u32 n_stream(=1), u32 cell_count,
//   per cell: i32 pos, u32 n_seq_id(=1), i32 seq_id,
//   u32 v_trans, u32 n_layer,
//   per layer: i32 k_type, u64 k_row_bytes, K rows [cell][row bytes]
//   v_trans 0, per layer: i32 v_type, u64 v_row_bytes, V rows [cell][row bytes]
//   v_trans 1, per layer: i32 v_type, u32 elem bytes, u32 n_embd_v_gqa, V^T [n_embd_v_gqa][cell][elem bytes]
//

// Cell-major K and V bytes in the cache types: [n_layer][n_cells][row bytes of that layer].
typedef struct {
    uio_kv_layout layout;
    int32_t       seq_id;
    int32_t       n_cells;
    llama_pos   * pos;
    uint8_t     * k;
    uint8_t     * v;
} kv_cells;

static void kv_cells_free(kv_cells * cells) {
    free(cells->pos);
    free(cells->k);
    free(cells->v);
    memset(cells, 0, sizeof(*cells));
}

static size_t k_row_bytes(const uio_kv_layout * layout, int32_t layer) {
    return ggml_row_size((enum ggml_type) layout->k_type[layer], layout->n_embd_k_gqa);
}

static size_t v_row_bytes(const uio_kv_layout * layout, int32_t layer) {
    return ggml_row_size((enum ggml_type) layout->v_type[layer], layout->n_embd_v_gqa);
}

// Total bytes of K (or V) of every layer for n_cells cells.
static size_t cells_bytes(const uio_kv_layout * layout, int32_t n_cells, bool is_v) {
    size_t total = 0;
    for (int32_t l = 0; l < layout->n_layer; l++) {
        total += (size_t) n_cells * (is_v ? v_row_bytes(layout, l) : k_row_bytes(layout, l));
    }
    return total;
}

static size_t blob_size(const uio_kv_layout * layout, int32_t n_cells) {
    size_t size = 4 * 4 + (size_t) n_cells * 12 + 2 * 4;
    size += (size_t) layout->n_layer * (4 + 8) + cells_bytes(layout, n_cells, false);
    size += (size_t) layout->n_layer * (layout->v_trans ? 4 + 4 + 4 : 4 + 8) + cells_bytes(layout, n_cells, true);
    return size;
}

typedef struct {
    uint8_t * p;
} writer;

static void put(writer * w, const void * src, size_t n) {
    memcpy(w->p, src, n);
    w->p += n;
}

static void put_u32(writer * w, uint32_t x) { put(w, &x, 4); }
static void put_i32(writer * w, int32_t x)  { put(w, &x, 4); }
static void put_u64(writer * w, uint64_t x) { put(w, &x, 8); }

// V^T of one layer: element j of every cell, then element j+1, ...
static void put_v_transposed(writer * w, const uint8_t * rows, int32_t n_cells, int32_t width, size_t elem) {
    for (int32_t j = 0; j < width; j++) {
        for (int32_t c = 0; c < n_cells; c++) {
            put(w, rows + ((size_t) c * width + j) * elem, elem);
        }
    }
}

// Writes the blob of `cells` (blob_size bytes) into out.
static void write_blob(const kv_cells * cells, uint8_t * out) {
    const uio_kv_layout * layout = &cells->layout;
    writer w = {out};
    put_u32(&w, UIO_STATE_MAGIC);
    put_i32(&w, cells->seq_id);
    put_u32(&w, 1);
    put_u32(&w, (uint32_t) cells->n_cells);
    for (int32_t c = 0; c < cells->n_cells; c++) {
        put_i32(&w, cells->pos[c]);
        put_u32(&w, 1);
        put_i32(&w, cells->seq_id);
    }
    put_u32(&w, (uint32_t) layout->v_trans);
    put_u32(&w, (uint32_t) layout->n_layer);
    const uint8_t * k = cells->k;
    for (int32_t l = 0; l < layout->n_layer; l++) {
        const size_t row = k_row_bytes(layout, l);
        put_i32(&w, layout->k_type[l]);
        put_u64(&w, row);
        put(&w, k, row * cells->n_cells);
        k += row * cells->n_cells;
    }
    const uint8_t * v = cells->v;
    for (int32_t l = 0; l < layout->n_layer; l++) {
        const size_t row = v_row_bytes(layout, l);
        put_i32(&w, layout->v_type[l]);
        if (layout->v_trans) {
            const size_t elem = ggml_type_size((enum ggml_type) layout->v_type[l]);
            put_u32(&w, (uint32_t) elem);
            put_u32(&w, (uint32_t) layout->n_embd_v_gqa);
            put_v_transposed(&w, v, cells->n_cells, layout->n_embd_v_gqa, elem);
        } else {
            put_u64(&w, row);
            put(&w, v, row * cells->n_cells);
        }
        v += row * cells->n_cells;
    }
}

typedef struct {
    const uint8_t * p;
    size_t          size;
    size_t          off;
} reader;

static bool take(reader * r, void * dst, size_t n) {
    if (r->size - r->off < n) {
        return false;
    }
    if (dst) {
        memcpy(dst, r->p + r->off, n);
    }
    r->off += n;
    return true;
}

#define FORMAT_ERROR(...) fail(UIO_ERR_FORMAT, "llama.cpp state format differs: " __VA_ARGS__)

static bool valid_type(int32_t type) {
    return type >= 0 && type < GGML_TYPE_COUNT && ggml_blck_size((enum ggml_type) type) > 0 &&
           ggml_type_size((enum ggml_type) type) > 0;
}

// Elements in a row of `bytes` bytes of `type`, or -1 when bytes is not a whole number of blocks.
static int64_t row_width(int32_t type, uint64_t bytes) {
    const size_t ts = ggml_type_size((enum ggml_type) type);
    if (bytes == 0 || bytes % ts != 0) {
        return -1;
    }
    return (int64_t) (bytes / ts) * ggml_blck_size((enum ggml_type) type);
}

// Checks that `width` agrees with the width the earlier layers gave (stored in *known, 0 = none yet).
static bool same_width(int32_t * known, int64_t width) {
    if (width <= 0 || width > INT32_MAX) {
        return false;
    }
    if (*known == 0) {
        *known = (int32_t) width;
    }
    return *known == width;
}

static int32_t parse_header(reader * r, kv_cells * out) {
    uint32_t magic, n_stream, n_cells;
    if (!take(r, &magic, 4) || !take(r, &out->seq_id, 4) || !take(r, &n_stream, 4)) {
        return FORMAT_ERROR("blob of %zu bytes is shorter than its header", r->size);
    }
    if (magic != UIO_STATE_MAGIC) {
        return FORMAT_ERROR("magic 0x%08x, expected 0x%08x", magic, UIO_STATE_MAGIC);
    }
    if (n_stream != 1) {
        return FORMAT_ERROR("%u KV streams, expected 1: create the context with kv_unified = true", n_stream);
    }
    if (!take(r, &n_cells, 4)) {
        return FORMAT_ERROR("no cell count");
    }
    if (n_cells > (r->size - r->off) / 12) {
        return FORMAT_ERROR("cell count %u does not fit in the blob", n_cells);
    }
    out->n_cells = (int32_t) n_cells;
    return UIO_OK;
}

static int32_t parse_cells(reader * r, kv_cells * out) {
    out->pos = malloc(sizeof(llama_pos) * (out->n_cells ? out->n_cells : 1));
    if (!out->pos) {
        return fail(UIO_ERR_NOMEM, "out of memory");
    }
    for (int32_t c = 0; c < out->n_cells; c++) {
        uint32_t n_seq_id;
        int32_t  seq_id;
        if (!take(r, &out->pos[c], 4) || !take(r, &n_seq_id, 4)) {
            return FORMAT_ERROR("truncated cell %d", c);
        }
        if (n_seq_id != 1) {
            return FORMAT_ERROR("cell %d lists %u sequences, expected 1 (extra per-cell data in this version?)", c, n_seq_id);
        }
        if (!take(r, &seq_id, 4)) {
            return FORMAT_ERROR("truncated cell %d", c);
        }
        if (seq_id != out->seq_id) {
            return FORMAT_ERROR("cell %d belongs to sequence %d, the blob to %d", c, seq_id, out->seq_id);
        }
    }
    return UIO_OK;
}

// Reads one layer's K rows or V rows (v_trans 0) into dst (may be NULL: only check and skip).
static int32_t parse_rows(reader * r, int32_t layer, bool is_v, kv_cells * out, uint8_t * dst) {
    const char * name = is_v ? "V" : "K";
    int32_t  type;
    uint64_t row_bytes;
    if (!take(r, &type, 4) || !take(r, &row_bytes, 8)) {
        return FORMAT_ERROR("truncated %s header of layer %d", name, layer);
    }
    if (!valid_type(type)) {
        return FORMAT_ERROR("layer %d %s type %d is not a ggml type", layer, name, type);
    }
    const int64_t width = row_width(type, row_bytes);
    if (!same_width(is_v ? &out->layout.n_embd_v_gqa : &out->layout.n_embd_k_gqa, width) ||
        ggml_row_size((enum ggml_type) type, width) != row_bytes) {
        return FORMAT_ERROR("layer %d %s row of %llu bytes of %s does not match the other layers", layer, name,
                            (unsigned long long) row_bytes, ggml_type_name((enum ggml_type) type));
    }
    (is_v ? out->layout.v_type : out->layout.k_type)[layer] = type;
    // divide rather than multiply: a corrupted row size must not overflow into a plausible length
    if (row_bytes > (r->size - r->off) / out->n_cells || !take(r, dst, row_bytes * out->n_cells)) {
        return FORMAT_ERROR("truncated %s rows of layer %d", name, layer);
    }
    return UIO_OK;
}

// Reads one layer's transposed V (v_trans 1) into cell-major rows dst (may be NULL).
static int32_t parse_v_transposed(reader * r, int32_t layer, kv_cells * out, uint8_t * dst) {
    int32_t  type;
    uint32_t elem, width;
    if (!take(r, &type, 4) || !take(r, &elem, 4) || !take(r, &width, 4)) {
        return FORMAT_ERROR("truncated V header of layer %d", layer);
    }
    if (!valid_type(type) || ggml_blck_size((enum ggml_type) type) != 1 || ggml_type_size((enum ggml_type) type) != elem) {
        return FORMAT_ERROR("layer %d transposed V has type %d with %u-byte elements", layer, type, elem);
    }
    if (!same_width(&out->layout.n_embd_v_gqa, width)) {
        return FORMAT_ERROR("layer %d V width %u does not match the other layers", layer, width);
    }
    out->layout.v_type[layer] = type;
    if ((r->size - r->off) / elem / width < (size_t) out->n_cells) {
        return FORMAT_ERROR("truncated V of layer %d", layer);
    }
    for (uint32_t j = 0; j < width; j++) {
        for (int32_t c = 0; c < out->n_cells; c++) {
            take(r, dst ? dst + ((size_t) c * width + j) * elem : NULL, elem);
        }
    }
    return UIO_OK;
}

static int32_t parse_layers(reader * r, kv_cells * out, bool want_data) {
    uint32_t v_trans, n_layer;
    if (!take(r, &v_trans, 4) || !take(r, &n_layer, 4)) {
        return FORMAT_ERROR("no v_trans / n_layer after the cells");
    }
    if (v_trans > 1) {
        return FORMAT_ERROR("v_trans is %u", v_trans);
    }
    if (n_layer == 0 || n_layer > UIO_MAX_LAYERS) {
        return FORMAT_ERROR("n_layer is %u", n_layer);
    }
    out->layout.v_trans = (int32_t) v_trans;
    out->layout.n_layer = (int32_t) n_layer;
    // K first: its row sizes give the buffer size; V is sized after its headers are known, so the
    // checks run in one pass and the data is copied in a second one when wanted.
    const size_t k_start = r->off;
    for (int pass = 0; pass < (want_data ? 2 : 1); pass++) {
        r->off = k_start;
        uint8_t * k = pass ? out->k : NULL;
        uint8_t * v = pass ? out->v : NULL;
        for (int32_t l = 0; l < out->layout.n_layer; l++) {
            int32_t rc = parse_rows(r, l, false, out, k);
            if (rc) return rc;
            if (k) k += k_row_bytes(&out->layout, l) * out->n_cells;
        }
        for (int32_t l = 0; l < out->layout.n_layer; l++) {
            int32_t rc = v_trans ? parse_v_transposed(r, l, out, v) : parse_rows(r, l, true, out, v);
            if (rc) return rc;
            if (v) v += v_row_bytes(&out->layout, l) * out->n_cells;
        }
        if (!pass && want_data) {
            out->k = malloc(cells_bytes(&out->layout, out->n_cells, false) + 1);
            out->v = malloc(cells_bytes(&out->layout, out->n_cells, true) + 1);
            if (!out->k || !out->v) {
                return fail(UIO_ERR_NOMEM, "out of memory");
            }
        }
    }
    return UIO_OK;
}

// Parses a whole blob; on success the caller frees *out with kv_cells_free. Returns 0 or a code.
static int32_t parse_blob(const uint8_t * blob, size_t size, kv_cells * out, bool want_data) {
    memset(out, 0, sizeof(*out));
    reader r = {blob, size, 0};
    int32_t rc = parse_header(&r, out);
    if (!rc) rc = parse_cells(&r, out);
    if (!rc && out->n_cells > 0) rc = parse_layers(&r, out, want_data);
    if (!rc && r.off != size) {
        rc = FORMAT_ERROR("%zu bytes left after the last layer", size - r.off);
    }
    if (rc) {
        kv_cells_free(out);
    }
    return rc;
}

int32_t uio_kv_parse(const uint8_t * blob, size_t size, uio_kv_layout * layout_out) {
    if (!blob) {
        return fail(UIO_ERR_ARG, "uio_kv_parse: null blob");
    }
    kv_cells cells;
    int32_t rc = parse_blob(blob, size, &cells, false);
    if (rc) {
        return rc;
    }
    if (layout_out) {
        *layout_out = cells.layout;
    }
    const int32_t n_cells = cells.n_cells;
    kv_cells_free(&cells);
    return n_cells;
}

//
// Talking to the context
//

static int32_t check_seq(struct llama_context * ctx, llama_seq_id seq, const char * what) {
    const uint32_t n_seq_max = llama_n_seq_max(ctx);
    if (seq < 0 || (uint32_t) seq >= n_seq_max) {
        return fail(UIO_ERR_ARG, "%s %d is outside [0, n_seq_max = %u)", what, seq, n_seq_max);
    }
    return UIO_OK;
}

// The state blob of one sequence, malloc'ed; NULL (with the error set) on failure.
static uint8_t * get_seq_state(struct llama_context * ctx, llama_seq_id seq, size_t * size) {
    *size = llama_state_seq_get_size(ctx, seq);
    uint8_t * blob = *size ? malloc(*size) : NULL;
    if (!blob) {
        fail(*size ? UIO_ERR_NOMEM : UIO_ERR_LLAMA, "llama_state_seq_get_size(seq %d) gave %zu bytes", seq, *size);
        return NULL;
    }
    const size_t got = llama_state_seq_get_data(ctx, blob, *size, seq);
    if (got != *size) {
        free(blob);
        fail(UIO_ERR_LLAMA, "llama_state_seq_get_data(seq %d) wrote %zu bytes, expected %zu", seq, got, *size);
        return NULL;
    }
    return blob;
}

static int32_t decode_one_token(struct llama_context * ctx, llama_seq_id seq) {
    const struct llama_vocab * vocab = llama_model_get_vocab(llama_get_model(ctx));
    const llama_token bos = llama_vocab_bos(vocab);
    struct llama_batch batch = llama_batch_init(1, 0, 1);
    batch.n_tokens     = 1;
    batch.token[0]     = bos >= 0 ? bos : 0;
    batch.pos[0]       = 0;
    batch.n_seq_id[0]  = 1;
    batch.seq_id[0][0] = seq;
    batch.logits[0]    = 1;
    const int32_t rc = llama_decode(ctx, batch);
    llama_batch_free(batch);
    return rc ? fail(UIO_ERR_LLAMA, "probe: llama_decode of one token into sequence %d failed (%d)", seq, rc) : UIO_OK;
}

// Checks that the one-cell blob of the probe parses as expected and that our writer reproduces it.
static int32_t verify_probe_blob(struct llama_context * ctx, const uint8_t * blob, size_t size, llama_seq_id scratch, uio_kv_layout * out) {
    kv_cells cells;
    int32_t rc = parse_blob(blob, size, &cells, true);
    if (rc) {
        return rc;
    }
    const int32_t n_layer = llama_model_n_layer(llama_get_model(ctx));
    if (cells.seq_id != scratch || cells.n_cells != 1 || cells.pos[0] != 0) {
        rc = FORMAT_ERROR("probe blob holds %d cells of sequence %d, expected 1 cell of %d at position 0", cells.n_cells, cells.seq_id, scratch);
    } else if (cells.layout.n_layer != n_layer) {
        rc = FORMAT_ERROR("the cache has %d layers, the model %d (shared or sliding-window KV layers are not supported)", cells.layout.n_layer, n_layer);
    } else if (blob_size(&cells.layout, 1) != size) {
        rc = FORMAT_ERROR("our writer sizes the probe blob at %zu bytes, llama.cpp wrote %zu", blob_size(&cells.layout, 1), size);
    } else {
        uint8_t * rebuilt = malloc(size);
        if (!rebuilt) {
            rc = fail(UIO_ERR_NOMEM, "out of memory");
        } else {
            write_blob(&cells, rebuilt);
            size_t i = 0;
            while (i < size && rebuilt[i] == blob[i]) i++;
            if (i < size) {
                rc = FORMAT_ERROR("our writer differs from llama.cpp's blob at byte %zu of %zu", i, size);
            }
            free(rebuilt);
        }
    }
    if (!rc) {
        *out = cells.layout;
    }
    kv_cells_free(&cells);
    return rc;
}

int32_t uio_kv_probe(struct llama_context * ctx, llama_seq_id scratch_seq, uio_kv_layout * out) {
    if (!ctx || !out) {
        return fail(UIO_ERR_ARG, "uio_kv_probe: null context or output");
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (!mem) {
        return fail(UIO_ERR_LLAMA, "the context has no memory (KV cache)");
    }
    int32_t rc = check_seq(ctx, scratch_seq, "scratch sequence");
    if (rc) {
        return rc;
    }
    if (llama_memory_seq_pos_max(mem, scratch_seq) != -1) {
        return fail(UIO_ERR_ARG, "scratch sequence %d is not empty", scratch_seq);
    }
    rc = decode_one_token(ctx, scratch_seq);
    if (rc) {
        llama_memory_seq_rm(mem, scratch_seq, -1, -1);
        return rc;
    }
    size_t size;
    uint8_t * blob = get_seq_state(ctx, scratch_seq, &size);
    llama_memory_seq_rm(mem, scratch_seq, -1, -1);
    if (!blob) {
        return UIO_ERR_LLAMA;
    }
    rc = verify_probe_blob(ctx, blob, size, scratch_seq, out);
    free(blob);
    return rc;
}

//
// Writes and reads
//

static int32_t check_layout(const uio_kv_layout * layout) {
    if (layout->n_layer <= 0 || layout->n_layer > UIO_MAX_LAYERS || layout->n_embd_k_gqa <= 0 || layout->n_embd_v_gqa <= 0) {
        return fail(UIO_ERR_ARG, "invalid layout: call uio_kv_probe first");
    }
    for (int32_t l = 0; l < layout->n_layer; l++) {
        if (!valid_type(layout->k_type[l]) || !valid_type(layout->v_type[l])) {
            return fail(UIO_ERR_ARG, "invalid layout: layer %d has no valid cache type", l);
        }
    }
    return UIO_OK;
}

// float32 rows -> rows of the cache type (f32 copy, f16/bf16 rounding, or reference quantization).
static int32_t convert_rows(int32_t type, const float * src, int64_t n_rows, int64_t width, uint8_t * dst) {
    const enum ggml_type t = (enum ggml_type) type;
    const struct ggml_type_traits * traits = ggml_get_type_traits(t);
    const bool plain = t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
    if (!plain && (!traits->from_float_ref || ggml_quantize_requires_imatrix(t))) {
        return fail(UIO_ERR_TYPE, "cannot write float rows into a %s cache", ggml_type_name(t));
    }
    if (width % ggml_blck_size(t) != 0) {
        return fail(UIO_ERR_TYPE, "rows of %lld do not split into %s blocks", (long long) width, ggml_type_name(t));
    }
    ggml_quantize_chunk(t, src, dst, 0, n_rows, width, NULL);
    return UIO_OK;
}

// Fills cells->k / cells->v from float K [n_layer][n][dk] and V [n_layer][n][dv].
static int32_t convert_cells(kv_cells * cells, const float * k, const float * v) {
    const uio_kv_layout * layout = &cells->layout;
    const int32_t n = cells->n_cells;
    cells->k = malloc(cells_bytes(layout, n, false));
    cells->v = malloc(cells_bytes(layout, n, true));
    if (!cells->k || !cells->v) {
        return fail(UIO_ERR_NOMEM, "out of memory");
    }
    uint8_t * kd = cells->k;
    uint8_t * vd = cells->v;
    for (int32_t l = 0; l < layout->n_layer; l++) {
        const float * ks = k + (size_t) l * n * layout->n_embd_k_gqa;
        const float * vs = v + (size_t) l * n * layout->n_embd_v_gqa;
        int32_t rc = convert_rows(layout->k_type[l], ks, n, layout->n_embd_k_gqa, kd);
        if (!rc) rc = convert_rows(layout->v_type[l], vs, n, layout->n_embd_v_gqa, vd);
        if (rc) return rc;
        kd += k_row_bytes(layout, l) * n;
        vd += v_row_bytes(layout, l) * n;
    }
    return UIO_OK;
}

static int compare_pos(const void * a, const void * b) {
    const llama_pos x = *(const llama_pos *) a, y = *(const llama_pos *) b;
    return (x > y) - (x < y);
}

// Sorted copy of the positions, checked to be non-negative and distinct; NULL (error set) otherwise.
static llama_pos * sorted_positions(const llama_pos * pos, int32_t n) {
    llama_pos * sorted = malloc(sizeof(llama_pos) * n);
    if (!sorted) {
        fail(UIO_ERR_NOMEM, "out of memory");
        return NULL;
    }
    memcpy(sorted, pos, sizeof(llama_pos) * n);
    qsort(sorted, n, sizeof(llama_pos), compare_pos);
    for (int32_t i = 0; i < n; i++) {
        if (sorted[i] < 0 || (i > 0 && sorted[i] == sorted[i - 1])) {
            fail(UIO_ERR_ARG, "positions must be distinct and non-negative (%d)", sorted[i]);
            free(sorted);
            return NULL;
        }
    }
    return sorted;
}

// Removes seq's cells at the sorted positions, one seq_rm per run of consecutive positions.
static void remove_positions(llama_memory_t mem, llama_seq_id seq, const llama_pos * sorted, int32_t n) {
    for (int32_t i = 0; i < n;) {
        int32_t j = i + 1;
        while (j < n && sorted[j] == sorted[j - 1] + 1) j++;
        llama_memory_seq_rm(mem, seq, sorted[i], sorted[j - 1] + 1);
        i = j;
    }
}

// Loads the blob into scratch, then moves its cells over to seq (replacing seq's cells at those positions).
static int32_t load_via_scratch(struct llama_context * ctx, const uint8_t * blob, size_t size, llama_seq_id seq,
                                llama_seq_id scratch, const llama_pos * sorted, int32_t n) {
    llama_memory_t mem = llama_get_memory(ctx);
    const size_t got = llama_state_seq_set_data(ctx, blob, size, scratch);
    if (got != size) {
        llama_memory_seq_rm(mem, scratch, -1, -1);
        return fail(UIO_ERR_LLAMA, "llama_state_seq_set_data took %zu of %zu bytes (no room for %d cells? see the llama.cpp log)", got, size, n);
    }
    remove_positions(mem, seq, sorted, n);
    llama_memory_seq_cp(mem, scratch, seq, -1, -1);  // shares the cells: a unified cache copies no data
    llama_memory_seq_rm(mem, scratch, -1, -1);
    return UIO_OK;
}

int32_t uio_kv_write(struct llama_context * ctx, const uio_kv_layout * layout, llama_seq_id seq_id, llama_seq_id scratch_seq,
                     const llama_pos * pos, int32_t n_cells, const float * k, const float * v) {
    if (!ctx || !layout || (n_cells > 0 && (!pos || !k || !v)) || n_cells < 0) {
        return fail(UIO_ERR_ARG, "uio_kv_write: null argument or negative cell count");
    }
    int32_t rc = check_layout(layout);
    if (!rc) rc = check_seq(ctx, seq_id, "sequence");
    if (!rc) rc = check_seq(ctx, scratch_seq, "scratch sequence");
    if (rc) {
        return rc;
    }
    if (seq_id == scratch_seq) {
        return fail(UIO_ERR_ARG, "the scratch sequence must differ from the target sequence %d", seq_id);
    }
    if (n_cells == 0) {
        return UIO_OK;
    }
    llama_pos * sorted = sorted_positions(pos, n_cells);
    if (!sorted) {
        return UIO_ERR_ARG;
    }
    kv_cells cells = {.layout = *layout, .seq_id = scratch_seq, .n_cells = n_cells, .pos = NULL};
    rc = convert_cells(&cells, k, v);
    uint8_t * blob = NULL;
    const size_t size = blob_size(layout, n_cells);
    if (!rc && !(blob = malloc(size))) {
        rc = fail(UIO_ERR_NOMEM, "out of memory");
    }
    if (!rc) {
        cells.pos = (llama_pos *) pos;
        write_blob(&cells, blob);
        cells.pos = NULL;  // borrowed: not ours to free
        rc = load_via_scratch(ctx, blob, size, seq_id, scratch_seq, sorted, n_cells);
    }
    free(blob);
    free(sorted);
    kv_cells_free(&cells);
    return rc;
}

static bool same_layout(const uio_kv_layout * a, const uio_kv_layout * b) {
    if (a->n_layer != b->n_layer || a->n_embd_k_gqa != b->n_embd_k_gqa || a->n_embd_v_gqa != b->n_embd_v_gqa || a->v_trans != b->v_trans) {
        return false;
    }
    for (int32_t l = 0; l < a->n_layer; l++) {
        if (a->k_type[l] != b->k_type[l] || a->v_type[l] != b->v_type[l]) {
            return false;
        }
    }
    return true;
}

// Cache-type rows of every layer -> float32 [n_layer][n][width].
static void cells_to_float(const kv_cells * cells, bool is_v, float * dst) {
    const uio_kv_layout * layout = &cells->layout;
    const int64_t width = is_v ? layout->n_embd_v_gqa : layout->n_embd_k_gqa;
    const uint8_t * src = is_v ? cells->v : cells->k;
    for (int32_t l = 0; l < layout->n_layer; l++) {
        const enum ggml_type type = (enum ggml_type) (is_v ? layout->v_type[l] : layout->k_type[l]);
        const int64_t n = (int64_t) cells->n_cells * width;
        if (type == GGML_TYPE_F32) {
            memcpy(dst, src, n * sizeof(float));
        } else {
            ggml_get_type_traits(type)->to_float(src, dst, n);
        }
        src += (is_v ? v_row_bytes(layout, l) : k_row_bytes(layout, l)) * cells->n_cells;
        dst += n;
    }
}

int32_t uio_kv_read(struct llama_context * ctx, const uio_kv_layout * layout, llama_seq_id seq_id,
                    int32_t max_cells, llama_pos * pos, float * k, float * v) {
    if (!ctx || !layout) {
        return fail(UIO_ERR_ARG, "uio_kv_read: null argument");
    }
    int32_t rc = check_layout(layout);
    if (!rc) rc = check_seq(ctx, seq_id, "sequence");
    if (rc) {
        return rc;
    }
    size_t size;
    uint8_t * blob = get_seq_state(ctx, seq_id, &size);
    if (!blob) {
        return UIO_ERR_LLAMA;
    }
    const bool want = pos || k || v;
    kv_cells cells;
    rc = parse_blob(blob, size, &cells, want);
    free(blob);
    if (rc) {
        return rc;
    }
    const int32_t n = cells.n_cells;
    if (n > 0 && !same_layout(&cells.layout, layout)) {
        rc = fail(UIO_ERR_FORMAT, "the cache of sequence %d no longer has the probed layout", seq_id);
    } else if (want && n > max_cells) {
        rc = fail(UIO_ERR_ARG, "sequence %d holds %d cells, more than max_cells = %d", seq_id, n, max_cells);
    } else if (want && n > 0) {
        if (pos) memcpy(pos, cells.pos, sizeof(llama_pos) * n);
        if (k) cells_to_float(&cells, false, k);
        if (v) cells_to_float(&cells, true, v);
    }
    kv_cells_free(&cells);
    return rc ? rc : n;
}
