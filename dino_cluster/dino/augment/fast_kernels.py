"""Compiled (numba) kernels of the fast multi-crop pipeline, each bit-exact with the PIL or
torchvision operation of the reference that it replaces.

Images are planar uint8: one contiguous (H*W,) or (H, W) plane per channel, so every loop
runs over contiguous memory and LLVM vectorizes it (PIL's own loops are scalar, over 4-byte
pixels). Exactness comes from doing PIL's arithmetic, not an approximation of it: the same
fixed-point resampling weights, the same float32 blend, the same 8-bit HSV round trip with
its float/double mix, the same box-blur accumulators. Tests compare every kernel with PIL
(tests/test_augment_fast.py); the hue kernel was checked on all 2**24 colours.

`error_model="numpy"` drops Python's division-by-zero checks, whose branches stop the
vectorizer (measured: the hue kernel ran 34 ns/pixel with them, 7 without, planar).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

_JIT = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")

# Columns of the parameter table (same layout as batched.py, which the device stage uses).
FLIP, JITTER, ORDER = 0, 1, 2
BRIGHTNESS, CONTRAST, SATURATION, HUE = 6, 7, 8, 9
GRAY, BLUR, SIGMA, SOLARIZE = 10, 11, 12, 13
N_PARAMS = 14
CROP_TRIES = 10
DRAWS = 2 * CROP_TRIES + 2 + 14  # uniforms per crop: box tries, box position, photometric
_DECISIONS = (FLIP, JITTER, GRAY, BLUR, SOLARIZE)
_PRECISION_BITS = 22  # PIL's fixed-point resampling precision for 8-bit images (32 - 8 - 2)


# -- random draws: crop boxes and the parameter table --------------------------------------------
@nb.njit(**_JIT)
def crop_box(width, height, s0, s1, u):
    """torchvision's RandomResizedCrop.get_params on 22 uniforms: (top, left, h, w)."""
    area = width * height
    lr0, lr1 = math.log(3.0 / 4.0), math.log(4.0 / 3.0)
    for t in range(CROP_TRIES):
        target = area * (s0 + (s1 - s0) * u[2 * t])
        aspect = math.exp(lr0 + (lr1 - lr0) * u[2 * t + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2 * CROP_TRIES] * (height - h + 1)), height - h)
            left = min(int(u[2 * CROP_TRIES + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    ratio = width / height  # fallback: the central crop at the nearest allowed aspect ratio
    if ratio < 3.0 / 4.0:
        w, h = width, int(round(width / (3.0 / 4.0)))
    elif ratio > 4.0 / 3.0:
        w, h = int(round(height * (4.0 / 3.0))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@nb.njit(**_JIT)
def draw_table(u, width, height, scales, thresholds, low, span, boxes, params):
    """Per crop i: boxes[i] = (top, left, h, w) and params[i] (N_PARAMS) from uniforms u[i]
    (DRAWS): factor columns scaled into their ranges, decisions thresholded, the jitter op
    order the ranks of four uniforms (a uniform random permutation), as batched.draw."""
    decisions = np.array(_DECISIONS)
    for i in range(u.shape[0]):
        q = u[i, 2 * CROP_TRIES + 2 :]
        top, left, h, w = crop_box(width, height, scales[i, 0], scales[i, 1], u[i])
        boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3] = top, left, h, w
        for j in range(N_PARAMS):
            params[i, j] = np.float32(low[j] + q[j] * span[j])
        for d in range(decisions.shape[0]):
            col = decisions[d]
            params[i, col] = np.float32(1.0) if q[col] < thresholds[i, d] else np.float32(0.0)
        rank = np.argsort(q[ORDER : ORDER + 4])
        for j in range(4):
            params[i, ORDER + j] = np.float32(rank[j])


# -- resize: PIL's bicubic resampling of a crop box --------------------------------------------
@nb.njit(**_JIT)
def _bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@nb.njit(**_JIT)
def resample_coeffs(n_in, n_out):
    """PIL's precompute_coeffs + normalize_coeffs_8bpc for bicubic: per output index its
    first input index and tap count (bounds), and fixed-point taps (kk)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros((n_out, 2), np.int64)
    kk = np.zeros((n_out, ksize), np.int32)
    k = np.zeros(ksize, np.float64)
    ss = 1.0 / filterscale
    one = float(1 << _PRECISION_BITS)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in) - xmin
        ww = 0.0
        for x in range(xmax):
            k[x] = _bicubic((x + xmin - center + 0.5) * ss)
            ww += k[x]
        for x in range(xmax):
            w = k[x] / ww if ww != 0.0 else k[x]
            kk[xx, x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
        bounds[xx, 0], bounds[xx, 1] = xmin, xmax
    return bounds, kk


@nb.njit(**_JIT)
def _resample_rows(src, first, col, bounds, kk, out):
    """out[i, j] = PIL-rounded sum_k kk[i, k] * src[first + bounds[i, 0] + k, col + j]: rows
    of src run along the resampled axis; the loop over j is contiguous and vectorizes."""
    n = out.shape[1]
    acc = np.empty(n, np.int32)
    half = np.int32(1 << (_PRECISION_BITS - 1))
    for i in range(out.shape[0]):
        acc[:] = half
        b0 = first + bounds[i, 0]
        for k in range(bounds[i, 1]):
            w = kk[i, k]
            row = src[b0 + k, col : col + n]
            for j in range(n):
                acc[j] += np.int32(row[j]) * w
        for j in range(n):
            v = acc[j] >> _PRECISION_BITS
            out[i, j] = 0 if v < 0 else (255 if v > 255 else v)


@nb.njit(**_JIT)
def transpose_to_planes(hwc, out):
    """(H, W, 3) interleaved -> (3, W, H) planes, x-major: each column of the image becomes a
    contiguous row, which the horizontal resampling pass reads. In 16x16 tiles (measured
    0.21 ms for 500x375, 0.32 ms row by row: the tile's source rows stay in L1)."""
    h, w = hwc.shape[0], hwc.shape[1]
    for y0 in range(0, h, 16):
        y1 = min(y0 + 16, h)
        for x0 in range(0, w, 16):
            for x in range(x0, min(x0 + 16, w)):
                for y in range(y0, y1):
                    out[0, x, y] = hwc[y, x, 0]
                    out[1, x, y] = hwc[y, x, 1]
                    out[2, x, y] = hwc[y, x, 2]


@nb.njit(**_JIT)
def resize_crops(planes, boxes, out):
    """out[n] (3, S, S) = PIL's crop(box).resize((S, S), BICUBIC) of image `planes` (3, W, H
    from transpose_to_planes) for every box (top, left, h, w): horizontal pass, rounded to
    uint8, then vertical pass, exactly as PIL (bit-exact)."""
    size = out.shape[2]
    for n in range(boxes.shape[0]):
        top, left, h, w = boxes[n, 0], boxes[n, 1], boxes[n, 2], boxes[n, 3]
        bx, kx = resample_coeffs(w, size)
        by, ky = resample_coeffs(h, size)
        mid = np.empty((size, h), np.uint8)
        mid_t = np.empty((h, size), np.uint8)
        for c in range(3):
            # rows of planes[c] are image columns: resampling them over x is PIL's pass 1
            _resample_rows(planes[c], left, top, bx, kx, mid)
            mid_t[:] = mid.T
            _resample_rows(mid_t, 0, 0, by, ky, out[n, c])


# -- photometric ops on planar crops (3, N) uint8, in place ------------------------------------
@nb.njit(**_JIT)
def _luma(r, g, b):
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    return (np.int32(r) * 19595 + np.int32(g) * 38470 + np.int32(b) * 7471 + 32768) >> 16


@nb.njit(**_JIT)
def _blend8(degenerate, v, alpha):
    """PIL's Image.blend(degenerate, image, alpha) on one value, float32 as in Blend.c."""
    temp = np.float32(degenerate) + alpha * np.float32(v - degenerate)
    if temp <= 0.0:
        return np.uint8(0)
    if temp >= 255.0:
        return np.uint8(255)
    return np.uint8(temp)


@nb.njit(**_JIT)
def brightness_(x, factor):
    """ImageEnhance.Brightness: blend with black."""
    f = np.float32(factor)
    for c in range(3):
        p = x[c]
        for k in range(p.shape[0]):
            p[k] = _blend8(np.int32(0), np.int32(p[k]), f)


@nb.njit(**_JIT)
def contrast_(x, factor):
    """ImageEnhance.Contrast: blend with flat grey at int(mean(L) + 0.5) (ImageStat's mean)."""
    r, g, b = x[0], x[1], x[2]
    total = 0
    for k in range(r.shape[0]):
        total += _luma(r[k], g[k], b[k])
    mean = np.int32(int(total / r.shape[0] + 0.5))
    f = np.float32(factor)
    for c in range(3):
        p = x[c]
        for k in range(p.shape[0]):
            p[k] = _blend8(mean, np.int32(p[k]), f)


@nb.njit(**_JIT)
def saturation_(x, factor):
    """ImageEnhance.Color: blend with the image's own L."""
    r, g, b = x[0], x[1], x[2]
    f = np.float32(factor)
    for k in range(r.shape[0]):
        grey = _luma(r[k], g[k], b[k])
        r[k] = _blend8(grey, np.int32(r[k]), f)
        g[k] = _blend8(grey, np.int32(g[k]), f)
        b[k] = _blend8(grey, np.int32(b[k]), f)


@nb.njit(**_JIT)
def _round_half_away(v):
    """C's round() for v >= 0, exactly: v - floor(v) is exact in floating point."""
    fl = math.floor(v)
    return np.int32(fl) + np.int32((v - fl) >= 0.5)


@nb.njit(**_JIT)
def hue_(x, shift):
    """torchvision's adjust_hue on PIL: RGB -> 8-bit HSV (PIL's rgb2hsv), H += shift (mod
    256), -> RGB (PIL's hsv2rgb), with PIL's float and double steps. Written without
    branches (selects) so that it vectorizes."""
    rp, gp, bp = x[0], x[1], x[2]
    for k in range(rp.shape[0]):
        r, g, b = np.int32(rp[k]), np.int32(gp[k]), np.int32(bp[k])
        mx, mn = max(r, max(g, b)), min(r, min(g, b))
        cr = mx - mn
        crf = np.float32(max(cr, 1))
        s = crf / np.float32(max(mx, 1))
        rc, gc, bc = np.float32(mx - r) / crf, np.float32(mx - g) / crf, np.float32(mx - b) / crf
        h_g = np.float32(2.0 + np.float64(rc) - np.float64(bc))
        h_b = np.float32(4.0 + np.float64(gc) - np.float64(rc))
        h = (bc - gc) if r == mx else (h_g if g == mx else h_b)
        hd = np.float64(h) / 6.0 + 1.0
        hf = np.float32(hd - math.floor(hd))  # fmod(hd, 1.0) for hd > 0, stored as float
        uh = min(max(np.int32(np.float64(hf) * 255.0), 0), 255)
        us = min(max(np.int32(np.float64(s) * 255.0), 0), 255)
        us = 0 if cr == 0 else us
        uh = ((0 if cr == 0 else uh) + shift) & 255
        v = np.float64(mx)
        hh = np.float64(uh) * 6.0 / 255.0
        fi = math.floor(hh)
        i = np.int32(fi)
        f = np.float32(hh - fi)
        fs = np.float32(np.float64(us) / 255.0)
        p = min(max(_round_half_away(v * (1.0 - np.float64(fs))), 0), 255)
        q = min(max(_round_half_away(v * (1.0 - np.float64(fs * f))), 0), 255)
        t = min(max(_round_half_away(v * (1.0 - np.float64(fs) * (1.0 - np.float64(f)))), 0), 255)
        i = 0 if i == 6 else i
        ro = mx if (i == 0 or i == 5) else (q if i == 1 else (t if i == 4 else p))
        go = t if i == 0 else (mx if i <= 2 else (q if i == 3 else p))
        bo = p if i <= 1 else (t if i == 2 else (mx if i <= 4 else q))
        grey = us == 0
        rp[k] = mx if grey else ro
        gp[k] = mx if grey else go
        bp[k] = mx if grey else bo


@nb.njit(**_JIT)
def hue_float_(x, turns):
    """batched_ops.hue_ per pixel: a float32 HSV rotation by `turns` (max, min and chroma
    kept) instead of PIL's 8-bit HSV round trip; the same shift (the caller quantises it as
    the reference does), pixels a few levels from PIL's (batched_ops.py says where). 5.5x
    cheaper than `hue_` (0.067 vs 0.37 ms per 224 crop): no double-precision steps."""
    rp, gp, bp = x[0], x[1], x[2]
    one, two, three = np.float32(1.0), np.float32(2.0), np.float32(3.0)
    t6 = np.float32(turns) * np.float32(6.0)
    # per channel shift n_c - 2 + 6 turns - 3, folded into [-5, 1) as batched_ops does
    s0 = np.float32((np.float64(t6) + 5.0) % 6.0 - 5.0)
    s1 = np.float32((np.float64(t6) + 3.0) % 6.0 - 5.0)
    s2 = np.float32((np.float64(t6) + 1.0) % 6.0 - 5.0)
    for k in range(rp.shape[0]):
        r, g, b = np.float32(rp[k]), np.float32(gp[k]), np.float32(bp[k])
        mx, mn = max(max(r, g), b), min(min(r, g), b)
        c = mx - mn
        inv = one / max(c, one)
        is_r = one if mx == r else np.float32(0.0)
        is_g = (one if mx == g else np.float32(0.0)) * (one - is_r)
        is_b = one - is_r - is_g
        h = ((g - b) * is_r + (b - r) * is_g + (r - g) * is_b) * inv + is_g * two + is_b * 4.0
        base = mn * two - mx + np.float32(0.5)
        rp[k] = np.uint8(math.floor(min(max(abs(abs(h + s0) - three), one), two) * c + base))
        gp[k] = np.uint8(math.floor(min(max(abs(abs(h + s1) - three), one), two) * c + base))
        bp[k] = np.uint8(math.floor(min(max(abs(abs(h + s2) - three), one), two) * c + base))


@nb.njit(**_JIT)
def grayscale_(x):
    """rgb_to_grayscale(num_output_channels=3) on PIL: L in all three channels."""
    r, g, b = x[0], x[1], x[2]
    for k in range(r.shape[0]):
        v = np.uint8(_luma(r[k], g[k], b[k]))
        r[k] = v
        g[k] = v
        b[k] = v


@nb.njit(**_JIT)
def gaussian_box_radius(sigma):
    """PIL's _gaussian_blur_radius(sigma, 3 passes), float and double steps as in BoxBlur.c."""
    one, two, three, six = np.float32(1.0), np.float32(2.0), np.float32(3.0), np.float32(6.0)
    radius = np.float32(sigma)
    sigma2 = np.float32(radius * radius) / three
    big_l = np.float32(math.sqrt(12.0 * np.float64(sigma2) + 1.0))
    small_l = np.float32(math.floor((np.float64(big_l) - 1.0) / 2.0))
    a = (two * small_l + one) * (small_l * (small_l + one) - three * sigma2)
    a = a / (six * (sigma2 - (small_l + one) * (small_l + one)))
    return small_l + a


@nb.njit(**_JIT)
def _box_pass(src, dst, radius, ww, fw):
    """One PIL box-blur line pass (ImagingLineBoxBlur) along axis 0 of (n, m) planes, for
    all m lines at once: the accumulators are a row vector, so the pass vectorizes. PIL's
    UINT32 arithmetic never wraps here (acc * ww + 2 * 255 * fw <= 255 * 2**24), so 32-bit
    lanes are exact; every result is cast back to uint32 so that LLVM keeps 32-bit vectors
    (numba widens integer arithmetic to 64 bits: 0.58 ms per 224 crop instead of 0.50)."""
    n, m = src.shape
    last = n - 1
    edge_a, edge_b = min(radius + 1, n), max(n - radius - 1, 0)
    w32, f32, half = np.uint32(ww), np.uint32(fw), np.uint32(1 << 23)
    acc = np.empty(m, np.uint32)
    for j in range(m):
        acc[j] = np.uint32(src[0, j]) * np.uint32(radius + 1)
    for x in range(edge_a - 1):
        for j in range(m):
            acc[j] = np.uint32(acc[j] + np.uint32(src[x, j]))
    for j in range(m):
        acc[j] = np.uint32(acc[j] + np.uint32(src[last, j]) * np.uint32(radius - edge_a + 1))
    for x in range(n):
        # PIL's three loop phases (both of its branches) come down to: the pixel leaving
        # the window is the first one until edgeA, the one entering and the far fractional
        # neighbour are clamped to the last pixel from edgeB on
        sub = 0 if x < edge_a else x - radius - 1
        add = x + radius if x < edge_b else last
        far = x + radius + 1 if x < edge_b else last
        s_row, a_row, f_row, d_row = src[sub], src[add], src[far], dst[x]
        for j in range(m):
            a = np.uint32(np.uint32(acc[j] + np.uint32(a_row[j])) - np.uint32(s_row[j]))
            acc[j] = a
            bulk = np.uint32(a * w32 + np.uint32(np.uint32(s_row[j]) + np.uint32(f_row[j])) * f32)
            d_row[j] = np.uint8(np.uint32(bulk + half) >> np.uint32(24))


@nb.njit(**_JIT)
def gaussian_blur_(x, side, sigma):
    """ImageFilter.GaussianBlur(sigma) on planar (3, side*side) crops: PIL's three box-blur
    passes along x, then three along y, each rounded to uint8, bit-exact. The passes along
    x run on the transposed plane: PIL's running window sum is serial along a line, so the
    vector runs across lines (computing each window directly instead, without a transpose,
    measured 2-3x slower)."""
    fr = gaussian_box_radius(sigma)
    if fr == 0:
        return
    radius = int(fr)
    ww = int(np.uint32(np.float32(16777216.0) / (fr * np.float32(2.0) + np.float32(1.0))))
    fw = ((1 << 24) - (radius * 2 + 1) * ww) // 2
    a = np.empty((side, side), np.uint8)
    b = np.empty((side, side), np.uint8)
    for c in range(3):
        plane = x[c].reshape(side, side)
        a[:] = plane.T
        _box_pass(a, b, radius, ww, fw)
        _box_pass(b, a, radius, ww, fw)
        _box_pass(a, b, radius, ww, fw)
        a[:] = b.T
        _box_pass(a, b, radius, ww, fw)
        _box_pass(b, a, radius, ww, fw)
        _box_pass(a, plane, radius, ww, fw)


@nb.njit(**_JIT)
def photometric_batch(src, params, lut, out, exact_hue):
    """src (B, 3, S, S) uint8 crops, params (B, N_PARAMS), lut (3, 256) float32 (to_tensor +
    Normalize per channel, built with torchvision) -> out (B, 3, S, S) float32: flip, colour
    jitter in each crop's op order, grayscale, blur, solarize, normalise: the reference's
    ops in the reference's order, each bit-exact (hue: with `exact_hue`, else hue_float_)."""
    side = src.shape[2]
    n = side * side
    work = np.empty((3, n), np.uint8)
    for i in range(src.shape[0]):
        p = params[i]
        for c in range(3):
            flat, dst = src[i, c].reshape(n), work[c]
            if p[FLIP] > 0:
                for y in range(side):
                    row = y * side
                    for xx in range(side):
                        dst[row + xx] = flat[row + side - 1 - xx]
            else:
                for k in range(n):  # a flat loop: 2-D slice assignment measured 2x slower
                    dst[k] = flat[k]
        if p[JITTER] > 0:
            for slot in range(4):
                op = int(p[ORDER + slot])
                if op == 0:
                    brightness_(work, p[BRIGHTNESS])
                elif op == 1:
                    contrast_(work, p[CONTRAST])
                elif op == 2:
                    saturation_(work, p[SATURATION])
                else:
                    # torchvision: np.int32(hue_factor * 255) (truncated), added mod 256
                    steps = np.int32(np.float64(p[HUE]) * 255.0)
                    if exact_hue:
                        hue_(work, steps & 255)
                    else:
                        hue_float_(work, np.float32(steps / 255.0))
        if p[GRAY] > 0:
            grayscale_(work)
        if p[BLUR] > 0:
            gaussian_blur_(work, side, p[SIGMA])
        solar = p[SOLARIZE] > 0
        for c in range(3):
            w, o, t = work[c], out[i, c].reshape(n), lut[c]
            for k in range(n):
                v = w[k]
                if solar and v >= 128:
                    v = 255 - v
                o[k] = t[v]
