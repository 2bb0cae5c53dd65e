// uio_plugin: the native part of uio-gguf, compiled against the llama.cpp headers and libraries that
// llama-cpp-python installs (not a fork). Two services:
//   - capture: the per-layer activations (attn_norm, Kcur pre-RoPE, Vcur) of every row of ONE
//     llama_decode, through the context's eval callback;
//   - KV write: memory cells (float K already RoPE'd, V) written into a sequence of the KV cache at
//     given positions, through the sequence-state format of llama_state_seq_set_data.
// Every function that can fail returns 0 (or a count) on success and a negative UIO_ERR_* code on
// failure; uio_last_error() (per thread) or uio_capture_error_message() says why in one line.
#ifndef UIO_PLUGIN_H
#define UIO_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#define UIO_PLUGIN_VERSION 1
#define UIO_MAX_LAYERS 512

enum uio_error {
    UIO_OK               =  0,
    UIO_ERR_ARG          = -1,  // a bad argument (null pointer, size, position, sequence id)
    UIO_ERR_NOMEM        = -2,
    UIO_ERR_FORMAT       = -3,  // the llama.cpp state format is not the one this plugin knows
    UIO_ERR_LLAMA        = -4,  // a llama.cpp call failed (decode, state get/set)
    UIO_ERR_TYPE         = -5,  // a tensor or cache type this plugin cannot convert
    UIO_ERR_CAPTURE      = -6,  // a captured node had an unexpected shape or row count
    UIO_ERR_NOT_CAPTURED = -7,  // the decode did not show every layer's attn_norm, Kcur and Vcur
};

enum uio_capture_kind {
    UIO_KIND_ATTN_NORM = 0,  // width n_embd
    UIO_KIND_KCUR      = 1,  // width n_embd_k_gqa, before RoPE
    UIO_KIND_VCUR      = 2,  // width n_embd_v_gqa
};

// Per-thread one-line reason of the last failure of a uio_kv_* function.
const char * uio_last_error(void);
int32_t uio_plugin_version(void);

//
// Capture
//

typedef struct uio_capture uio_capture;

uio_capture * uio_capture_new(int32_t n_layer, int32_t n_embd, int32_t n_embd_k_gqa, int32_t n_embd_v_gqa, int32_t max_rows);
void uio_capture_free(uio_capture * cap);

// The next decode's batch has exactly n_rows tokens (one ubatch: n_ubatch >= n_rows); capture all of them.
void uio_capture_arm(uio_capture * cap, int32_t n_rows);
// Ask for no node: decodes run as without a callback, bar one cheap name check per node.
void uio_capture_disarm(uio_capture * cap);

// Set as llama_context_params.cb_eval with cb_eval_user_data = the capture.
bool uio_capture_eval_cb(struct ggml_tensor * t, bool ask, void * user_data);

// After the decode: 0 if every layer's attn_norm, Kcur and Vcur were captured for all rows, else a
// negative code that uio_capture_error_message() explains.
int32_t uio_capture_status(const uio_capture * cap);
const char * uio_capture_error_message(const uio_capture * cap);
int32_t uio_capture_n_rows(const uio_capture * cap);

// float32 rows [n_rows][width] of one layer (see uio_capture_kind); NULL for a bad kind or layer.
const float * uio_capture_rows(const uio_capture * cap, int32_t kind, int32_t layer);

//
// KV cache layout and writes
//

typedef struct {
    int32_t n_layer;
    int32_t n_embd_k_gqa;
    int32_t n_embd_v_gqa;
    int32_t v_trans;                  // 1: V stored transposed (flash attention off)
    int32_t k_type[UIO_MAX_LAYERS];   // enum ggml_type of each layer's K and V cache
    int32_t v_type[UIO_MAX_LAYERS];
} uio_kv_layout;

// Learns the cache layout of ctx and verifies the state format: decodes one token into scratch_seq
// (which must be empty) at position 0, reads it back with llama_state_seq_get_data, parses it, checks
// every size field, rebuilds the same blob with our writer and checks it is byte-identical, then
// removes scratch_seq's cells. The decode overwrites the context's logits (and would feed an armed
// capture: disarm it first). Needs kv_unified = true.
int32_t uio_kv_probe(struct llama_context * ctx, llama_seq_id scratch_seq, uio_kv_layout * out);

// Writes n_cells cells into seq_id at the distinct positions pos[0..n_cells):
// k = float32 [n_layer][n_cells][n_embd_k_gqa] (already RoPE'd), v = float32 [n_layer][n_cells][n_embd_v_gqa].
// Cells of seq_id at those positions are replaced; its other cells stay untouched. Goes through
// scratch_seq (any content it had is dropped; it is empty afterwards). Needs a unified KV cache
// (kv_unified = true) with n_seq_max > scratch_seq, scratch_seq != seq_id, and n_cells free cells.
// llama.cpp then wants the next token of seq_id at llama_memory_seq_pos_max(seq_id) + 1, and assumes a
// sequence's positions have no gaps: write memory where it keeps them contiguous.
int32_t uio_kv_write(struct llama_context * ctx, const uio_kv_layout * layout, llama_seq_id seq_id, llama_seq_id scratch_seq,
                     const llama_pos * pos, int32_t n_cells, const float * k, const float * v);

// Reads every cell of seq_id back as float32, in cache order: pos[n], k [n_layer][n][n_embd_k_gqa],
// v [n_layer][n][n_embd_v_gqa]. Returns the number of cells (all NULL outputs: just count them) or a
// negative code (also when the sequence has more than max_cells cells).
int32_t uio_kv_read(struct llama_context * ctx, const uio_kv_layout * layout, llama_seq_id seq_id,
                    int32_t max_cells, llama_pos * pos, float * k, float * v);

// Parses a sequence-state blob as llama_state_seq_get_data writes it: fills the layout and returns the
// number of cells, or a negative code with a reason in uio_last_error(). (For checks and tests.)
int32_t uio_kv_parse(const uint8_t * blob, size_t size, uio_kv_layout * layout_out);

#ifdef __cplusplus
}
#endif

#endif  // UIO_PLUGIN_H
