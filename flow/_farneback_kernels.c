/* Native CPU kernels for flow/farneback.py, loaded by flow/_farneback_native.py.

   Each function repeats the float32/float64 operations of the eager torch code it replaces
   (farneback._expand, farneback._refine, cvresize.pyramid_level, cvresize.resize_flow) in the
   same order, so the results agree bit for bit: products and sums stay separate (compiled with
   -ffp-contract=off and without fast-math), fmaf() stands exactly where the eager code fuses,
   float32 results are rounded before being widened where the eager ops round them, and running
   sums accumulate in float64 in the same sequence.

   Every loop over a row takes its arrays as restrict parameters: that is what lets the compiler
   vectorise it (block-scope restrict pointers are not enough for GCC). */

#include <math.h>
#include <stdlib.h>

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* One step of the vertical pass: the moments c0, c1, c2 += (p g, d xg, p xxg) with
   p = up + down, d = down - up (float32, products and sums separate). */
static void vertical_step(const float *restrict up, const float *restrict down, int w, float gk,
                          float xgk, float xxgk, float *restrict c0, float *restrict c1,
                          float *restrict c2)
{
    for (int x = 0; x < w; x++) {
        float p = up[x] + down[x], d = down[x] - up[x];
        float t0 = p * gk, t1 = d * xgk, t2 = p * xxgk;
        c0[x] = c0[x] + t0; c1[x] = c1[x] + t1; c2[x] = c2[x] + t2;
    }
}

/* One step of the horizontal pass: the columns at +-k of the moments into the float64 sums
   (b4, b1, b3, b5, b2, b6 as in farneback._expand). */
static void horizontal_step(const float *restrict c0, const float *restrict c1,
                            const float *restrict c2, int w, int k, float gk, float xgk,
                            double xxgkd, double *restrict b1, double *restrict b2,
                            double *restrict b3, double *restrict b4, double *restrict b5,
                            double *restrict b6)
{
    double gkd = gk;
    for (int x = 0; x < w; x++) {
        float s0 = c0[x + k] + c0[x - k], s1 = c1[x + k] + c1[x - k];
        float s2 = c2[x + k] + c2[x - k];
        float d0 = c0[x + k] - c0[x - k], d1 = c1[x + k] - c1[x - k];
        float p3 = s1 * gk, p5 = s2 * gk, p2 = d0 * xgk, p6 = d1 * xgk;
        b3[x] = b3[x] + (double)p3; b5[x] = b5[x] + (double)p5;
        b2[x] = b2[x] + (double)p2; b6[x] = b6[x] + (double)p6;
        double s0d = s0;  /* float32 products are exact in float64 */
        b4[x] = b4[x] + s0d * xxgkd; b1[x] = b1[x] + s0d * gkd;
    }
}

/* The coefficients from the sums through the inverse Gram matrix, rounded to float32. */
static void coefficients(const double *restrict b1, const double *restrict b2,
                         const double *restrict b3, const double *restrict b4,
                         const double *restrict b5, const double *restrict b6, int w,
                         double ig11, double ig03, double ig33, double ig55, float *restrict rx,
                         float *restrict ry, float *restrict rxx, float *restrict rxy,
                         float *restrict ryy)
{
    for (int x = 0; x < w; x++) {
        double constant = b1[x] * ig03;
        double q4 = b4[x] * ig33, q5 = b5[x] * ig33;
        rx[x] = (float)(b2[x] * ig11);
        ry[x] = (float)(b3[x] * ig11);
        rxx[x] = (float)(constant + q4);
        rxy[x] = (float)(b6[x] * ig55);
        ryy[x] = (float)(constant + q5);
    }
}

/* Polynomial expansion of one float32 image (h, w) into 5 planes (rx, ry, rxx, rxy, ryy),
   `plane` floats apart. g, xg, xxg: taps 0..n, float32 values. Returns 0, or -1 out of memory. */
int fb_expand(const float *img, int h, int w, int n, const float *g, const float *xg,
              const float *xxg, double ig11, double ig03, double ig33, double ig55,
              float *out, long plane)
{
    long wp = w + 2L * n;
    float *mom = malloc(sizeof(float) * 3 * wp);
    double *b = malloc(sizeof(double) * 6 * w);
    if (!mom || !b) { free(mom); free(b); return -1; }
    float *c0 = mom + n, *c1 = c0 + wp, *c2 = c1 + wp;
    double *b1 = b, *b2 = b + w, *b3 = b + 2L * w, *b4 = b + 3L * w, *b5 = b + 4L * w;
    double *b6 = b + 5L * w;
    for (int y = 0; y < h; y++) {
        /* Vertical moments under weights g, y g, y^2 g; rows at +-k paired, borders replicated. */
        const float *row = img + (long)y * w;
        for (int x = 0; x < w; x++) { c0[x] = row[x] * g[0]; c1[x] = 0.0f; c2[x] = 0.0f; }
        for (int k = 1; k <= n; k++) {
            const float *up = img + (long)clampi(y - k, 0, h - 1) * w;
            const float *down = img + (long)clampi(y + k, 0, h - 1) * w;
            vertical_step(up, down, w, g[k], xg[k], xxg[k], c0, c1, c2);
        }
        for (int k = 1; k <= n; k++) {
            c0[-k] = c0[0]; c1[-k] = c1[0]; c2[-k] = c2[0];
            c0[w - 1 + k] = c0[w - 1]; c1[w - 1 + k] = c1[w - 1]; c2[w - 1 + k] = c2[w - 1];
        }
        /* Horizontal pass into float64 sums b1..b6 (weights 1, x, y, x^2, y^2, xy). */
        for (int x = 0; x < w; x++) {
            float t0 = c0[x] * g[0], t1 = c1[x] * g[0], t2 = c2[x] * g[0];
            b1[x] = t0; b3[x] = t1; b5[x] = t2; b2[x] = 0.0; b4[x] = 0.0; b6[x] = 0.0;
        }
        for (int k = 1; k <= n; k++)
            horizontal_step(c0, c1, c2, w, k, g[k], xg[k], xxg[k], b1, b2, b3, b4, b5, b6);
        float *o = out + (long)y * w;
        coefficients(b1, b2, b3, b4, b5, b6, w, ig11, ig03, ig33, ig55, o, o + plane,
                     o + 2 * plane, o + 3 * plane, o + 4 * plane);
    }
    free(mom); free(b);
    return 0;
}

/* Where row y's pixels land: bilinear weights, cell index and whether all four neighbours are
   in the image. floor(p) in [0, size - 2] means 0 <= p < size - 1, where floor(p) = (int)p. */
static void landing(const float *restrict fx, const float *restrict fy, int h, int w, int y,
                    float *restrict w00, float *restrict w01, float *restrict w10,
                    float *restrict w11, int *restrict cell, int *restrict inside)
{
    const float right = (float)(w - 1), bottom = (float)(h - 1);
    for (int x = 0; x < w; x++) {
        float px = fx[x] + (float)x, py = fy[x] + (float)y;
        int in = (px >= 0.0f) & (px < right) & (py >= 0.0f) & (py < bottom);
        px = in ? px : 0.0f;
        py = in ? py : 0.0f;
        int ix = (int)px, iy = (int)py;
        float wx1 = px - (float)ix, wy1 = py - (float)iy;
        float wx0 = 1.0f - wx1, wy0 = 1.0f - wy1;
        w00[x] = wx0 * wy0; w01[x] = wx1 * wy0; w10[x] = wx0 * wy1; w11[x] = wx1 * wy1;
        cell[x] = iy * w + ix;
        inside[x] = in;
    }
}

/* R1 (interleaved a1) bilinearly at the landing cells into 5 rows t, w floats apart. */
static void gather(const float *restrict a1, int w, const float *restrict w00,
                   const float *restrict w01, const float *restrict w10,
                   const float *restrict w11, const int *restrict cell, float *restrict t)
{
    const long row = 5L * w;
    for (int x = 0; x < w; x++) {
        const float *r = a1 + 5L * cell[x];
        for (int c = 0; c < 5; c++) {
            float q00 = r[c] * w00[x], q01 = r[5 + c] * w01[x];
            float q10 = r[row + c] * w10[x], q11 = r[row + 5 + c] * w11[x];
            float s = q00 + q01;
            s = s + q10;
            t[c * w + x] = s + q11;
        }
    }
}

/* Row y's equations: A = (A1 + A2) / 2, delta b = -(b2 - b1) / 2 + A d (R1 at x + d or, with a
   neighbour outside, A1 alone and b2 = 0), border weights, then G = A^T A and h = A^T delta b. */
static void equations(const float *restrict rx, const float *restrict ry,
                      const float *restrict rxx, const float *restrict rxy,
                      const float *restrict ryy, const float *restrict t,
                      const int *restrict inside,
                      const float *restrict fx, const float *restrict fy,
                      const float *restrict wgt, int w, float *restrict gxx, float *restrict gyy,
                      float *restrict hx, float *restrict hy, float *restrict gxy)
{
    for (int x = 0; x < w; x++) {
        int in = inside[x];
        float t0 = t[x], t1 = t[w + x], t2 = t[2 * w + x], t3 = t[3 * w + x], t4 = t[4 * w + x];
        float z0 = rx[x] * 0.0f, z1 = ry[x] * 0.0f;
        float s0 = in ? t0 : z0, s1 = in ? t1 : z1;
        float s2 = in ? t2 : rxx[x], s3 = in ? t3 : rxy[x], s4 = in ? t4 : ryy[x];
        float bx = s0 + rx[x], by = s1 + ry[x], axx = s2 + rxx[x], axy = s3 + rxy[x];
        float ayy = s4 + ryy[x];
        bx = bx * 0.5f; by = by * 0.5f; axx = axx * 0.5f; axy = axy * 0.25f; ayy = ayy * 0.5f;
        float dx = fx[x], dy = fy[x];
        float e0 = axy * dy, e1 = axx * dx, e2 = ayy * dy, e3 = axy * dx;
        float ex = e0 + e1, ey = e2 + e3;
        bx = bx + ex; by = by + ey;
        float k = wgt[x];
        bx = bx * k; by = by * k; axx = axx * k; axy = axy * k; ayy = ayy * k;
        float sxx = axx * axx, sxy = axy * axy, syy = ayy * ayy;
        float hx0 = axx * bx, hx1 = axy * by, hy0 = axy * bx, hy1 = ayy * by;
        float trace = axx + ayy;
        gxx[x] = sxx + sxy;
        gyy[x] = syy + sxy;
        hx[x] = hx0 + hx1;
        hy[x] = hy0 + hy1;
        gxy[x] = trace * axy;
    }
}

/* The five planes of m (gxx, gyy, hx, hy, gxy) from R0 (5 planes `cs` floats apart), R1
   interleaved per pixel with its first two channels negated (a1) and the flow (2 planes `fs`
   apart), row by row in three passes. rowbuf: 11 w floats. */
static void update_matrices(const float *r0, long cs, const float *a1, const float *flow, long fs,
                            const float *border, int h, int w, float *m, float *rowbuf)
{
    const long plane = (long)h * w;
    float *w00 = rowbuf, *w01 = w00 + w, *w10 = w01 + w, *w11 = w10 + w, *t = w11 + w;
    int *cell = (int *)(t + 5L * w), *inside = cell + w;
    for (int y = 0; y < h; y++) {
        const long o = (long)y * w;
        const float *fx = flow + o, *fy = flow + fs + o;
        if (h > 1 && w > 1) {
            landing(fx, fy, h, w, y, w00, w01, w10, w11, cell, inside);
            gather(a1, w, w00, w01, w10, w11, cell, t);
        } else {  /* no pixel has all four neighbours in the image */
            for (int x = 0; x < w; x++) inside[x] = 0;
        }
        const float *rx = r0 + o;
        equations(rx, rx + cs, rx + 2 * cs, rx + 3 * cs, rx + 4 * cs, t, inside, fx, fy,
                  border + o, w, m + o, m + plane + o, m + 2 * plane + o, m + 3 * plane + o,
                  m + 4 * plane + o);
    }
}

/* vs += (double)(add - drop), the difference in float32. */
static void vertical_slide(const float *restrict add, const float *restrict drop, int w,
                           double *restrict vs)
{
    for (int x = 0; x < w; x++) {
        float step = add[x] - drop[x];
        vs[x] = vs[x] + (double)step;
    }
}

/* The regularised 2x2 solve d = G^-1 h (paper eq. 13, OpenCV's det + 1e-3), in float64. */
static inline void solve(double gxx, double gyy, double hx, double hy, double gxy, float *fx,
                         float *fy)
{
    double p = gyy * gxx, q = gxy * gxy;
    double det = p - q;
    det = det + 1e-3;
    double inv_det = 1.0 / det;
    double u0 = gyy * hx, u1 = gxy * hy, v0 = gxx * hy, v1 = gxy * hx;
    double nx = u0 - u1, ny = v0 - v1;
    *fx = (float)(nx * inv_det);
    *fy = (float)(ny * inv_det);
}

/* Along the row: running sums of the 5 vertical sums vs (w doubles apart), means, and the
   solve into fx, fy. */
static void horizontal_solve(const double *restrict vs, int w, int radius, double inv_area,
                             float *restrict fx, float *restrict fy)
{
    double hs[5];
    for (int c = 0; c < 5; c++) {
        const double *v = vs + (long)c * w;
        double s = v[0] * (double)(radius + 2);
        for (int x = 1; x < radius; x++) s = s + v[x < w - 1 ? x : w - 1];
        hs[c] = s;
    }
    for (int x = 0; x < w; x++) {
        int xa = x + radius < w - 1 ? x + radius : w - 1;
        int xd = x - radius - 1 > 0 ? x - radius - 1 : 0;
        double g[5];
        for (int c = 0; c < 5; c++) {
            double step = vs[(long)c * w + xa] - vs[(long)c * w + xd];
            hs[c] = hs[c] + step;
            g[c] = hs[c] * inv_area;
        }
        solve(g[0], g[1], g[2], g[3], g[4], fx + x, fy + x);
    }
}

/* Box-window means of m (5 planes; running sums in float64 in OpenCV's order) and the solve,
   row by row, into the flow (2 planes `fs` floats apart). vs: 5 w doubles. */
static void window_solve(const float *m, int h, int w, int radius, double inv_area, double *vs,
                         float *flow, long fs)
{
    const long plane = (long)h * w;
    for (int c = 0; c < 5; c++) {
        const float *mc = m + c * plane;
        double *v = vs + (long)c * w;
        for (int x = 0; x < w; x++) {
            float first = mc[x] * (float)(radius + 2);
            v[x] = first;
        }
        for (int y = 1; y < radius; y++) {
            const float *r = mc + (long)(y < h - 1 ? y : h - 1) * w;
            for (int x = 0; x < w; x++) v[x] = v[x] + (double)r[x];
        }
    }
    for (int y = 0; y < h; y++) {
        const long add = (long)(y + radius < h - 1 ? y + radius : h - 1) * w;
        const long drop = (long)(y - radius - 1 > 0 ? y - radius - 1 : 0) * w;
        for (int c = 0; c < 5; c++)
            vertical_slide(m + c * plane + add, m + c * plane + drop, w, vs + (long)c * w);
        horizontal_solve(vs, w, radius, inv_area, flow + (long)y * w, flow + fs + (long)y * w);
    }
}

/* out = out + (a + b) t, float32, product and sum separate. */
static void add_pair(const float *restrict a, const float *restrict b, int w, float t,
                     float *restrict out)
{
    for (int x = 0; x < w; x++) {
        float pair = a[x] + b[x];
        float term = pair * t;
        out[x] = out[x] + term;
    }
}

/* out = a t, float32. */
static void scale_row(const float *restrict a, int w, float t, float *restrict out)
{
    for (int x = 0; x < w; x++) out[x] = a[x] * t;
}

/* Gaussian-window means of m (5 planes; separable, replicated borders, float32 as
   _farneback_ops.gaussian_window) and the solve, row by row, into the flow. taps: 0..radius.
   rowbuf: 5 (w + 2 radius) + 5 w floats. */
static void gaussian_solve(const float *m, int h, int w, int radius, const float *taps,
                           float *rowbuf, float *flow, long fs)
{
    const long plane = (long)h * w, padded = w + 2L * radius;
    float *vert = rowbuf, *win = rowbuf + 5 * padded;
    for (int y = 0; y < h; y++) {
        for (int c = 0; c < 5; c++) {
            const float *mc = m + c * plane;
            float *v = vert + c * padded + radius, *o = win + (long)c * w;
            scale_row(mc + (long)y * w, w, taps[0], v);
            for (int i = 1; i <= radius; i++)
                add_pair(mc + (long)clampi(y + i, 0, h - 1) * w,
                         mc + (long)clampi(y - i, 0, h - 1) * w, w, taps[i], v);
            for (int i = 1; i <= radius; i++) { v[-i] = v[0]; v[w - 1 + i] = v[w - 1]; }
            scale_row(v, w, taps[0], o);
            for (int i = 1; i <= radius; i++) add_pair(v + i, v - i, w, taps[i], o);
        }
        float *fx = flow + (long)y * w, *fy = flow + fs + (long)y * w;
        for (int x = 0; x < w; x++)
            solve(win[x], win[w + x], win[2L * w + x], win[3L * w + x], win[4L * w + x], fx + x,
                  fy + x);
    }
}

/* `iterations` displacement updates at one level, pair by pair: r0, r1 hold 5 planes `cs`
   floats apart (pair p at p h w), flow 2 planes `fs` apart, updated in place. The window is
   the box of side `winsize` (radius winsize / 2), or with gauss_taps (0..radius) the Gaussian.
   Returns 0, or -1 out of memory. */
int fb_refine(const float *r0, const float *r1, long cs, float *flow, long fs, int pairs,
              const float *border, int h, int w, int winsize, const float *gauss_taps,
              int iterations)
{
    const long plane = (long)h * w;
    const int radius = winsize / 2;
    const double inv_area = 1.0 / ((double)winsize * winsize);
    const long rowfloats = 11L * w > 10L * w + 10L * radius ? 11L * w : 10L * w + 10L * radius;
    float *buf = malloc(sizeof(float) * (10 * plane + rowfloats));
    double *vs = malloc(sizeof(double) * 5 * w);
    if (!buf || !vs) { free(buf); free(vs); return -1; }
    float *a1 = buf, *m = buf + 5 * plane, *rowbuf = buf + 10 * plane;
    for (int p = 0; p < pairs; p++) {
        /* R1 interleaved per pixel: the four neighbours' coefficients in two cache lines. */
        for (int c = 0; c < 5; c++) {
            const float *s1 = r1 + c * cs + p * plane;
            float sign = c < 2 ? -1.0f : 1.0f;  /* R1's b enters delta b negated */
            for (long i = 0; i < plane; i++) a1[5 * i + c] = sign * s1[i];
        }
        const float *a0 = r0 + p * plane;
        float *f = flow + p * plane;
        update_matrices(a0, cs, a1, f, fs, border, h, w, m, rowbuf);
        for (int i = 0; i < iterations; i++) {
            if (gauss_taps)
                gaussian_solve(m, h, w, radius, gauss_taps, rowbuf, f, fs);
            else
                window_solve(m, h, w, radius, inv_area, vs, f, fs);
            if (i < iterations - 1) update_matrices(a0, cs, a1, f, fs, border, h, w, m, rowbuf);
        }
    }
    free(buf); free(vs);
    return 0;
}

/* ---- pyramid and flow resizing (flow/cvresize.py) ------------------------------------------ */

/* OpenCV's default border (reflect 101: 2 1 | 0 1 2 .. n-1 | n-2), folding repeatedly. */
static inline int reflect101(int i, int n)
{
    if (n == 1) return 0;
    int period = 2 * (n - 1);
    i = (i < 0 ? -i : i) % period;
    return i >= n ? period - i : i;
}

/* One row of the horizontal blur pass from its padded row p (w + 2 r floats). */
static void blur_row(const float *restrict p, int w, const float *restrict taps, int ksize,
                     float *restrict out)
{
    if (ksize == 3) {
        for (int x = 0; x < w; x++) {
            float pair = p[x] + p[x + 2];
            out[x] = fmaf(p[x + 1], taps[1], pair * taps[2]);
        }
    } else if (ksize == 5) {
        for (int x = 0; x < w; x++) {
            float inner = p[x + 1] + p[x + 3], outer = p[x] + p[x + 4];
            out[x] = fmaf(outer, taps[4], fmaf(p[x + 2], taps[2], inner * taps[3]));
        }
    } else {
        for (int x = 0; x < w; x++) out[x] = p[x] * taps[0];
        for (int j = 1; j < ksize; j++)
            for (int x = 0; x < w; x++) out[x] = fmaf(p[x + j], taps[j], out[x]);
    }
}

/* out (+)= (a + b) * t fused, the vertical pass's symmetric pairs. */
static void blur_pair(const float *restrict a, const float *restrict b, int w, float t,
                      float *restrict out)
{
    for (int x = 0; x < w; x++) out[x] = fmaf(a[x] + b[x], t, out[x]);
}

/* cv2.GaussianBlur of one float32 image (h, w), as cvresize.gaussian_blur. Returns 0 or -1. */
int fb_blur(const float *img, int h, int w, const float *taps, int ksize, float *out)
{
    const int r = ksize / 2;
    float *tmp = malloc(sizeof(float) * ((long)h * w + w + 2L * r));
    if (!tmp) return -1;
    float *pad = tmp + (long)h * w;
    for (int y = 0; y < h; y++) {
        const float *row = img + (long)y * w;
        for (int j = 0; j < r; j++) {
            pad[j] = row[reflect101(j - r, w)];
            pad[w + r + j] = row[reflect101(w + j, w)];
        }
        for (int x = 0; x < w; x++) pad[r + x] = row[x];
        blur_row(pad, w, taps, ksize, tmp + (long)y * w);
    }
    for (int y = 0; y < h; y++) {
        float *o = out + (long)y * w;
        scale_row(tmp + (long)y * w, w, taps[r], o);
        for (int i = 1; i <= r; i++) {
            const float *a = tmp + (long)reflect101(y - i, h) * w;
            const float *b = tmp + (long)reflect101(y + i, h) * w;
            blur_pair(a, b, w, taps[r + i], o);
        }
    }
    free(tmp);
    return 0;
}

/* An exact halving: the mean of 2x2 blocks, (x00 + x01 + (x10 + x11)) * 0.25. */
int fb_halve(const float *img, int w, int oh, int ow, float *out)
{
    for (int y = 0; y < oh; y++) {
        const float *a = img + 2L * y * w, *b = a + w;
        float *o = out + (long)y * ow;
        for (int x = 0; x < ow; x++) {
            float top = a[2 * x] + a[2 * x + 1], bottom = b[2 * x] + b[2 * x + 1];
            o[x] = (top + bottom) * 0.25f;
        }
    }
    return 0;
}

/* IPP's linear resize: a + t (b - a) fused, along the rows (columns c0, c1, weights tx), then
   between rows r0, r1 (weights ty). tmp: 2 ow floats. */
int fb_lerp(const float *img, int w, int oh, int ow, const int *c0, const int *c1,
             const float *tx, const int *r0, const int *r1, const float *ty, float *tmp,
             float *out)
{
    float *top = tmp, *bottom = tmp + ow;
    for (int y = 0; y < oh; y++) {
        const float *a = img + (long)r0[y] * w, *b = img + (long)r1[y] * w;
        for (int x = 0; x < ow; x++) {
            float left = a[c0[x]], right = a[c1[x]];
            top[x] = fmaf(right - left, tx[x], left);
            left = b[c0[x]]; right = b[c1[x]];
            bottom[x] = fmaf(right - left, tx[x], left);
        }
        float *o = out + (long)y * ow;
        for (int x = 0; x < ow; x++) o[x] = fmaf(bottom[x] - top[x], ty[y], top[x]);
    }
    return 0;
}

/* cv2.resize INTER_LINEAR of one float32 plane, OpenCV's own code: weights (w0, w1) as
   separate products, along the rows then between them. tmp: 2 ow floats. */
int fb_resize_linear(const float *img, int w, int oh, int ow, const int *c0, const int *c1,
                      const float *wx0, const float *wx1, const int *r0, const int *r1,
                      const float *wy0, const float *wy1, float *tmp, float *out)
{
    float *top = tmp, *bottom = tmp + ow;
    for (int y = 0; y < oh; y++) {
        const float *a = img + (long)r0[y] * w, *b = img + (long)r1[y] * w;
        for (int x = 0; x < ow; x++) {
            float p0 = a[c0[x]] * wx0[x], p1 = a[c1[x]] * wx1[x];
            top[x] = p0 + p1;
            p0 = b[c0[x]] * wx0[x]; p1 = b[c1[x]] * wx1[x];
            bottom[x] = p0 + p1;
        }
        float *o = out + (long)y * ow;
        for (int x = 0; x < ow; x++) {
            float q0 = top[x] * wy0[y], q1 = bottom[x] * wy1[y];
            o[x] = q0 + q1;
        }
    }
    return 0;
}
