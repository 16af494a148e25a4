/* The expert MLP's fused hidden on the CPU, fp32, contiguous rows (megamoe/cpu_kernels.py builds and
 * loads it; megamoe/ops.py falls back to PyTorch ops where it is missing). One pass over the rows
 * instead of 3 (forward) and 7 (backward) PyTorch passes: docs/ARCHITECTURE.md, "Expert MLP buffers".
 * The products are those of ops.py's PyTorch kernels, in the same order; expf is glibc's vector
 * version (libmvec), so results may differ from PyTorch's by a rounding. */
#include <math.h>
#include <stdint.h>

#pragma omp declare simd notinbranch
float expf(float);

/* OpenMoE: h_gate rows [x1 | x2] (width 2I), out = silu(x2) * x1 * up, all [n, I] but h_gate. */
void gated_forward(const float *restrict h_gate, const float *restrict up, float *restrict out,
                   int64_t n, int64_t width) {
    for (int64_t r = 0; r < n; r++) {
        const float *x1 = h_gate + r * 2 * width, *x2 = x1 + width, *u = up + r * width;
        float *o = out + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) {
            float s = x2[i] * (1.0f / (1.0f + expf(-x2[i])));
            o[i] = s * x1[i] * u[i];
        }
    }
}

/* In place: d_x1 over x1, d_x2 over x2, d_up over grad; up is only read. */
void gated_backward(float *restrict h_gate, const float *restrict up, float *restrict grad,
                    int64_t n, int64_t width) {
    for (int64_t r = 0; r < n; r++) {
        float *x1 = h_gate + r * 2 * width, *x2 = x1 + width, *g = grad + r * width;
        const float *u = up + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; i++) {
            float sig = 1.0f / (1.0f + expf(-x2[i]));
            float s = x2[i] * sig;
            float d_a = u[i] * g[i];        /* d(x1 * silu(x2)) */
            float d_s = x1[i] * d_a;        /* d silu(x2) */
            float d_up = g[i] * x1[i] * s;
            x1[i] = d_a * s;
            x2[i] = d_s * sig * (1.0f + x2[i] * (1.0f - sig));
            g[i] = d_up;
        }
    }
}

/* Mixtral: out = silu(gate) * up, all [n, I]. */
void swiglu_forward(const float *restrict gate, const float *restrict up, float *restrict out,
                    int64_t n, int64_t width) {
    int64_t total = n * width;
#pragma omp simd
    for (int64_t i = 0; i < total; i++) {
        float s = gate[i] * (1.0f / (1.0f + expf(-gate[i])));
        out[i] = s * up[i];
    }
}

/* In place: d_gate over gate, d_up over grad; up is only read. */
void swiglu_backward(float *restrict gate, const float *restrict up, float *restrict grad,
                     int64_t n, int64_t width) {
    int64_t total = n * width;
#pragma omp simd
    for (int64_t i = 0; i < total; i++) {
        float sig = 1.0f / (1.0f + expf(-gate[i]));
        float s = gate[i] * sig;
        float d_s = up[i] * grad[i];
        float d_up = grad[i] * s;
        gate[i] = d_s * sig * (1.0f + gate[i] * (1.0f - sig));
        grad[i] = d_up;
    }
}
