/* Native fast paths of the wire format (blazil_ai/transport/framing.py is the reference).
 *
 * encode()       one message -> the buffers of its frame, byte for byte what framing's Python encoder writes
 *                (with a MessagePack writer and reader of its own for the types metadata is made of)
 * decode()       a whole frame -> Message; decode_body() a checked frame body -> Message (arrays are views)
 * parse_frames() whole frames out of a TCP read buffer -> Messages appended to a deque
 * read_frames()  the TCP receive path: wait, read and parse_frames in one call
 * send_frame()   the TCP offer path: encode and send in one call
 *
 * Only the success path lives here. Whenever anything is off (a malformed frame, a dtype not seen before,
 * an object that is not a plain numpy array), these functions hand the case to the Python reference
 * implementation, so every error message and every corner case has exactly one definition: framing.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#define HEADER_SIZE 20

static const char MAGIC[4] = {'B', 'L', 'Z', 'M'};

/* Set once by init() from framing.py. */
static PyObject *g_message;         /* framing.Message */
static PyObject *g_dtypes;          /* framing._DTYPES: wire dtype string -> checked np.dtype */
static PyObject *g_py_encode;       /* framing._py_encode (the reference, also the slow path) */
static PyObject *g_py_decode_body;  /* framing._py_decode_body */
static PyObject *g_py_decode;       /* framing._py_decode */
static long g_version;
static Py_ssize_t g_join_below;     /* frames up to this size come back as one bytes object */
static Py_ssize_t g_max_dims = 32;  /* framing.LIMITS.max_dims: more goes to the reference, which refuses it */
static int g_max_depth = 64;        /* framing.LIMITS.max_meta_depth: deeper metadata goes to msgpack */

static PyObject *s_append;
static PyObject *g_slot_meta, *g_slot_arrays, *g_slot_peer;  /* Message's slot descriptors */
static PyObject *g_empty_str;

/* Message(meta, arrays, peer) without running the dataclass's Python __init__. */
static PyObject *new_message(PyObject *meta, PyObject *arrays, PyObject *peer) {
    PyTypeObject *type = (PyTypeObject *)g_message;
    if (g_slot_meta == NULL)
        return PyObject_CallFunctionObjArgs(g_message, meta, arrays, peer ? peer : g_empty_str, NULL);
    PyObject *m = type->tp_alloc(type, 0);
    if (m == NULL) return NULL;
    if (Py_TYPE(g_slot_meta)->tp_descr_set(g_slot_meta, m, meta) < 0
        || Py_TYPE(g_slot_arrays)->tp_descr_set(g_slot_arrays, m, arrays) < 0
        || Py_TYPE(g_slot_peer)->tp_descr_set(g_slot_peer, m, peer ? peer : g_empty_str) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

static PyObject *w_init(PyObject *self, PyObject *args) {
    PyObject *message, *dtypes, *py_encode, *py_decode_body, *py_decode;
    long version;
    Py_ssize_t join_below, max_dims = 32;
    int max_depth = 64;
    if (!PyArg_ParseTuple(args, "OO!OOOln|ni", &message, &PyDict_Type, &dtypes, &py_encode, &py_decode_body,
                          &py_decode, &version, &join_below, &max_dims, &max_depth))
        return NULL;
    g_max_dims = max_dims < NPY_MAXDIMS ? max_dims : NPY_MAXDIMS;
    g_max_depth = max_depth;
    Py_XSETREF(g_py_decode, Py_NewRef(py_decode));
    Py_XSETREF(g_message, Py_NewRef(message));
    Py_CLEAR(g_slot_meta);
    Py_CLEAR(g_slot_arrays);
    Py_CLEAR(g_slot_peer);
    if (PyType_Check(message) && ((PyTypeObject *)message)->tp_alloc != NULL) {
        /* Only plain member slots qualify; anything else goes through the class call. */
        PyObject *a = PyObject_GetAttrString(message, "meta");
        PyObject *b = PyObject_GetAttrString(message, "arrays");
        PyObject *c = PyObject_GetAttrString(message, "peer");
        if (a && b && c && Py_TYPE(a) == &PyMemberDescr_Type && Py_TYPE(b) == &PyMemberDescr_Type
            && Py_TYPE(c) == &PyMemberDescr_Type) {
            g_slot_meta = a;
            g_slot_arrays = b;
            g_slot_peer = c;
        } else {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_XDECREF(c);
        }
        PyErr_Clear();
    }
    Py_XSETREF(g_dtypes, Py_NewRef(dtypes));
    Py_XSETREF(g_py_encode, Py_NewRef(py_encode));
    Py_XSETREF(g_py_decode_body, Py_NewRef(py_decode_body));
    g_version = version;
    g_join_below = join_below;
    Py_RETURN_NONE;
}

static int as_int(PyObject *o) {
    long v = PyLong_AsLong(o);
    if (v > INT_MAX || v < INT_MIN) {
        PyErr_SetString(PyExc_OverflowError, "value does not fit a C int");
        return -1;
    }
    return (int)v;
}

static void put_u16(char *p, unsigned v) { p[0] = (char)(v & 0xFF); p[1] = (char)(v >> 8); }
static void put_u32(char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (char)(v >> (8 * i)); }
static void put_u64(char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (char)(v >> (8 * i)); }
static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t get_u64(const unsigned char *p) {
    return (uint64_t)get_u32(p) | ((uint64_t)get_u32(p + 4) << 32);
}


/* ---- MessagePack, the subset every frame uses ------------------------------------------------------------
 * The writer produces exactly what msgpack.Packer(use_bin_type=True) writes for exact dict, list, tuple, str,
 * bytes, int, float, bool and None; the reader decodes what msgpack.unpackb(raw=False, strict_map_key=False)
 * decodes for those types. Anything else (ext types, subclasses, numpy scalars, invalid UTF-8, deep nesting)
 * makes them give up without an exception, and the caller falls back to the msgpack package. */


typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} wbuf_t;

static int wb_reserve(wbuf_t *w, Py_ssize_t extra) {
    if (w->len + extra <= w->cap) return 0;
    Py_ssize_t cap = w->cap ? w->cap : 256;
    while (cap < w->len + extra) cap *= 2;
    char *nb = PyMem_Realloc(w->buf, (size_t)cap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->buf = nb;
    w->cap = cap;
    return 0;
}

static int wb_put(wbuf_t *w, const void *src, Py_ssize_t n) {
    if (wb_reserve(w, n) < 0) return -1;
    memcpy(w->buf + w->len, src, (size_t)n);
    w->len += n;
    return 0;
}

static int wb_head(wbuf_t *w, unsigned char tag, uint64_t v, int nbytes) {
    unsigned char b[9];
    b[0] = tag;
    for (int i = 0; i < nbytes; i++) b[1 + i] = (unsigned char)(v >> (8 * (nbytes - 1 - i)));
    return wb_put(w, b, 1 + nbytes);
}

/* A length header: the fix form (fix_tag | n) when the format has one and n < fix_limit, else the 8-, 16- or
 * 32-bit form (t8 = 0: the format has no 8-bit form). 1 = written, 0 = too long for MessagePack, -1 = error set. */
static int wb_sized(wbuf_t *w, uint64_t n, unsigned char fix_tag, uint64_t fix_limit, unsigned char t8,
                    unsigned char t16, unsigned char t32) {
    int r;
    if (fix_tag && n < fix_limit) r = wb_head(w, (unsigned char)(fix_tag | n), 0, 0);
    else if (t8 && n < 256) r = wb_head(w, t8, n, 1);
    else if (n < 65536) r = wb_head(w, t16, n, 2);
    else if (n <= 0xFFFFFFFFu) r = wb_head(w, t32, n, 4);
    else return 0;
    return r < 0 ? -1 : 1;
}

/* An integer in the smallest form, as msgpack's packer picks it. 0 = written, -1 = error set. */
static int wb_int(wbuf_t *w, long long x) {
    if (x < -(1LL << 5)) {
        if (x < -(1LL << 15))
            return x < -(1LL << 31) ? wb_head(w, 0xd3, (uint64_t)x, 8) : wb_head(w, 0xd2, (uint64_t)x, 4);
        return x < -(1LL << 7) ? wb_head(w, 0xd1, (uint64_t)x, 2) : wb_head(w, 0xd0, (uint64_t)x, 1);
    }
    if (x < (1LL << 7)) return wb_head(w, (unsigned char)(x & 0xFF), 0, 0);
    if (x < (1LL << 16)) return x < (1LL << 8) ? wb_head(w, 0xcc, (uint64_t)x, 1) : wb_head(w, 0xcd, (uint64_t)x, 2);
    return x < (1LL << 32) ? wb_head(w, 0xce, (uint64_t)x, 4) : wb_head(w, 0xcf, (uint64_t)x, 8);
}

static int wb_str_head(wbuf_t *w, uint64_t n) { return wb_sized(w, n, 0xa0, 32, 0xd9, 0xda, 0xdb); }
static int wb_bin_head(wbuf_t *w, uint64_t n) { return wb_sized(w, n, 0, 0, 0xc4, 0xc5, 0xc6); }
static int wb_array_head(wbuf_t *w, uint64_t n) { return wb_sized(w, n, 0x90, 16, 0, 0xdc, 0xdd); }
static int wb_map_head(wbuf_t *w, uint64_t n) { return wb_sized(w, n, 0x80, 16, 0, 0xde, 0xdf); }

/* 1 = written, 0 = not a type this writer takes (nothing usable written), -1 = error set */
static int mp_write(wbuf_t *w, PyObject *o, int depth) {
    if (depth > g_max_depth) return 0;
    if (o == Py_None) return wb_head(w, 0xc0, 0, 0) < 0 ? -1 : 1;
    if (o == Py_True) return wb_head(w, 0xc3, 0, 0) < 0 ? -1 : 1;
    if (o == Py_False) return wb_head(w, 0xc2, 0, 0) < 0 ? -1 : 1;
    if (PyLong_CheckExact(o)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;  /* too big: msgpack raises the error */
            }
            return wb_head(w, 0xcf, u, 8) < 0 ? -1 : 1;
        }
        if (overflow < 0) return 0;
        if (x == -1 && PyErr_Occurred()) return -1;
        return wb_int(w, x) < 0 ? -1 : 1;
    }
    if (PyFloat_CheckExact(o)) {
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return wb_head(w, 0xcb, bits, 8) < 0 ? -1 : 1;
    }
    if (PyUnicode_CheckExact(o)) {
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(o, &n);
        if (u == NULL) {
            PyErr_Clear();  /* lone surrogates: msgpack names the fault */
            return 0;
        }
        int r = wb_str_head(w, (uint64_t)n);
        if (r <= 0) return r;
        return wb_put(w, u, n) < 0 ? -1 : 1;
    }
    if (PyBytes_CheckExact(o)) {
        Py_ssize_t n = PyBytes_GET_SIZE(o);
        int r = wb_bin_head(w, (uint64_t)n);
        if (r <= 0) return r;
        return wb_put(w, PyBytes_AS_STRING(o), n) < 0 ? -1 : 1;
    }
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
        int r = wb_array_head(w, (uint64_t)n);
        if (r <= 0) return r;
        for (Py_ssize_t i = 0; i < n; i++) {
            /* a list may change under us only through Python code, which nothing here runs */
            if (i >= PySequence_Fast_GET_SIZE(o)) return 0;
            int k = mp_write(w, PySequence_Fast_GET_ITEM(o, i), depth + 1);
            if (k <= 0) return k;
        }
        return 1;
    }
    if (PyDict_CheckExact(o)) {
        Py_ssize_t n = PyDict_GET_SIZE(o);
        int r = wb_map_head(w, (uint64_t)n);
        if (r <= 0) return r;
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v)) {
            int a = mp_write(w, k, depth + 1);
            if (a <= 0) return a;
            a = mp_write(w, v, depth + 1);
            if (a <= 0) return a;
        }
        return 1;
    }
    return 0;
}

typedef struct {
    const unsigned char *p, *end;
} rd_t;

static int rd_need(rd_t *r, Py_ssize_t n) { return r->end - r->p >= n; }

static uint64_t rd_be(rd_t *r, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | r->p[i];
    r->p += n;
    return v;
}

/* A new object, or NULL: with an exception set for a real failure (no memory), without one to give up. */
static PyObject *mp_read(rd_t *r, int depth) {
    if (depth > g_max_depth || !rd_need(r, 1)) return NULL;
    unsigned char t = *r->p++;
    Py_ssize_t n;
    if (t <= 0x7f) return PyLong_FromLong(t);
    if (t >= 0xe0) return PyLong_FromLong((long)(signed char)t);
    if ((t & 0xe0) == 0xa0) {
        n = t & 0x1f;
        goto str;
    }
    if ((t & 0xf0) == 0x90) {
        n = t & 0x0f;
        goto array;
    }
    if ((t & 0xf0) == 0x80) {
        n = t & 0x0f;
        goto map;
    }
    switch (t) {
    case 0xc0: Py_RETURN_NONE;
    case 0xc2: Py_RETURN_FALSE;
    case 0xc3: Py_RETURN_TRUE;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int nb = 1 << (t - 0xcc);
        if (!rd_need(r, nb)) return NULL;
        return PyLong_FromUnsignedLongLong(rd_be(r, nb));
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int nb = 1 << (t - 0xd0);
        if (!rd_need(r, nb)) return NULL;
        uint64_t v = rd_be(r, nb);
        long long x;
        if (nb == 1) x = (int8_t)v;
        else if (nb == 2) x = (int16_t)v;
        else if (nb == 4) x = (int32_t)v;
        else x = (int64_t)v;
        return PyLong_FromLongLong(x);
    }
    case 0xca: {
        if (!rd_need(r, 4)) return NULL;
        uint32_t bits = (uint32_t)rd_be(r, 4);
        float f;
        memcpy(&f, &bits, 4);
        return PyFloat_FromDouble((double)f);
    }
    case 0xcb: {
        if (!rd_need(r, 8)) return NULL;
        uint64_t bits = rd_be(r, 8);
        double d;
        memcpy(&d, &bits, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xd9: case 0xda: case 0xdb: {
        int nb = 1 << (t - 0xd9);
        if (!rd_need(r, nb)) return NULL;
        n = (Py_ssize_t)rd_be(r, nb);
        goto str;
    }
    case 0xc4: case 0xc5: case 0xc6: {
        int nb = 1 << (t - 0xc4);
        if (!rd_need(r, nb)) return NULL;
        n = (Py_ssize_t)rd_be(r, nb);
        if (n < 0 || !rd_need(r, n)) return NULL;
        PyObject *b = PyBytes_FromStringAndSize((const char *)r->p, n);
        r->p += n;
        return b;
    }
    case 0xdc: case 0xdd: {
        int nb = t == 0xdc ? 2 : 4;
        if (!rd_need(r, nb)) return NULL;
        n = (Py_ssize_t)rd_be(r, nb);
        goto array;
    }
    case 0xde: case 0xdf: {
        int nb = t == 0xde ? 2 : 4;
        if (!rd_need(r, nb)) return NULL;
        n = (Py_ssize_t)rd_be(r, nb);
        goto map;
    }
    default:
        return NULL;  /* ext types, and 0xc1 (never used): the msgpack package decides */
    }
str: {
    if (n < 0 || !rd_need(r, n)) return NULL;
    PyObject *u = PyUnicode_DecodeUTF8((const char *)r->p, n, NULL);
    if (u == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_MemoryError)) PyErr_Clear();  /* bad UTF-8: msgpack names it */
        return NULL;
    }
    r->p += n;
    return u;
}
array: {
    if (n < 0 || n > r->end - r->p) return NULL;  /* every element takes at least one byte */
    PyObject *l = PyList_New(n);
    if (l == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = mp_read(r, depth + 1);
        if (v == NULL) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, i, v);
    }
    return l;
}
map: {
    if (n < 0 || n > (r->end - r->p) / 2) return NULL;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *k = mp_read(r, depth + 1);
        if (k == NULL) {
            Py_DECREF(d);
            return NULL;
        }
        if (PyList_CheckExact(k) || PyDict_CheckExact(k)) {  /* unhashable: msgpack names the fault */
            Py_DECREF(k);
            Py_DECREF(d);
            return NULL;
        }
        PyObject *v = mp_read(r, depth + 1);
        if (v == NULL || PyDict_SetItem(d, k, v) < 0) {
            Py_DECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_MemoryError)) PyErr_Clear();
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}
}

static int plain_array(PyObject *a) {
    if (!PyArray_CheckExact(a)) return 0;
    PyArrayObject *arr = (PyArrayObject *)a;
    char kind = PyArray_DESCR(arr)->kind;
    if (!(kind == 'b' || kind == 'i' || kind == 'u' || kind == 'f' || kind == 'c')) return 0;
    if (PyArray_DESCR(arr)->byteorder != '=' && PyArray_DESCR(arr)->byteorder != '|'
        && PyArray_DESCR(arr)->byteorder != (PY_LITTLE_ENDIAN ? '<' : '>'))
        return 0;  /* byte-swapped: rare, the reference handles it */
    return PyArray_IS_C_CONTIGUOUS(arr);
}

static wbuf_t g_wb;  /* reused under the GIL: nothing in encode runs Python code */

static int put_dtype_str(wbuf_t *w, PyArray_Descr *d) {
    char order = d->byteorder;
    if (order == '=') order = PY_LITTLE_ENDIAN ? '<' : '>';
    char s[32];
    int n = snprintf(s, sizeof s, "%c%c%zd", order, d->kind, (Py_ssize_t)PyDataType_ELSIZE(d));
    if (n <= 0 || n >= 32) return 0;
    int r = wb_str_head(w, (uint64_t)n);
    if (r <= 0) return r;
    return wb_put(w, s, n) < 0 ? -1 : 1;
}

/* encode(meta, arrays, max_size) -> list of buffers; the same bytes as framing._py_encode. */
static PyObject *w_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) return PyObject_Vectorcall(g_py_encode, args, (size_t)nargs, NULL);
    PyObject *meta = args[0], *arrays = args[1];
    Py_ssize_t max_size = PyLong_AsSsize_t(args[2]);
    if (max_size == -1 && PyErr_Occurred()) return NULL;
    if (!PyDict_CheckExact(meta) && meta != Py_None) goto slow;
    Py_ssize_t n;
    if (PyList_CheckExact(arrays)) n = PyList_GET_SIZE(arrays);
    else if (PyTuple_CheckExact(arrays)) n = PyTuple_GET_SIZE(arrays);
    else goto slow;
    PyObject **items = PySequence_Fast_ITEMS(arrays);
    if (n > 16) goto slow;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!plain_array(items[i])) goto slow;

    wbuf_t *w = &g_wb;
    w->len = 0;
    if (wb_reserve(w, HEADER_SIZE) < 0) return NULL;
    w->len = HEADER_SIZE;
    int r = wb_head(w, 0x92, 0, 0);  /* [meta, descr] */
    if (r < 0) return NULL;
    r = meta == Py_None ? wb_map_head(w, 0) : mp_write(w, meta, 1);
    if (r < 0) return NULL;
    if (r == 0) goto slow;  /* a type only the msgpack package packs (or refuses with the right error) */
    if (wb_array_head(w, (uint64_t)n) < 0) return NULL;
    Py_ssize_t arrays_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyArrayObject *a = (PyArrayObject *)items[i];
        int nd = PyArray_NDIM(a);
        if (wb_head(w, 0x92, 0, 0) < 0) return NULL;
        r = put_dtype_str(w, PyArray_DESCR(a));
        if (r < 0) return NULL;
        if (r == 0) goto slow;
        if (wb_array_head(w, (uint64_t)nd) < 0) return NULL;
        for (int k = 0; k < nd; k++)
            if (wb_int(w, (long long)PyArray_DIM(a, k)) < 0) return NULL;
        arrays_len += PyArray_NBYTES(a);
    }
    Py_ssize_t meta_len = w->len - HEADER_SIZE;
    Py_ssize_t body_len = meta_len + arrays_len;
    Py_ssize_t total = HEADER_SIZE + body_len;
    if (total > max_size || meta_len > 0xFFFFFFFFLL) goto slow;  /* the reference raises the size error */
    char *h = w->buf;
    memcpy(h, MAGIC, 4);
    h[4] = (char)g_version;
    h[5] = 0;
    put_u16(h + 6, (unsigned)n);
    put_u32(h + 8, (uint32_t)meta_len);
    put_u64(h + 12, (uint64_t)body_len);

    PyObject *out;
    if (total <= g_join_below) {
        PyObject *frame = PyBytes_FromStringAndSize(NULL, total);
        if (frame == NULL) return NULL;
        char *p = PyBytes_AS_STRING(frame);
        memcpy(p, w->buf, (size_t)w->len);
        p += w->len;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyArrayObject *a = (PyArrayObject *)items[i];
            Py_ssize_t nb = PyArray_NBYTES(a);
            if (nb) memcpy(p, PyArray_DATA(a), (size_t)nb);
            p += nb;
        }
        out = PyList_New(1);
        if (out == NULL) {
            Py_DECREF(frame);
            return NULL;
        }
        PyList_SET_ITEM(out, 0, frame);
    } else {
        /* Large: the header and metadata in one buffer, then each array's own memory (no copy). */
        PyObject *head = PyBytes_FromStringAndSize(w->buf, w->len);
        if (head == NULL) return NULL;
        out = PyList_New(0);
        if (out == NULL || PyList_Append(out, head) < 0) {
            Py_DECREF(head);
            Py_XDECREF(out);
            return NULL;
        }
        Py_DECREF(head);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyArrayObject *a = (PyArrayObject *)items[i];
            if (PyArray_NBYTES(a) == 0) continue;
            PyObject *mv = PyMemoryView_FromObject((PyObject *)a);
            PyObject *flat = mv ? PyObject_CallMethod(mv, "cast", "s", "B") : NULL;
            Py_XDECREF(mv);
            if (flat == NULL || PyList_Append(out, flat) < 0) {
                Py_XDECREF(flat);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(flat);
        }
    }
    if (w->cap > (1 << 20)) {  /* one huge metadata map should not pin its buffer for ever */
        PyMem_Free(w->buf);
        w->buf = NULL;
        w->cap = 0;
    }
    w->len = 0;
    return out;

slow:
    g_wb.len = 0;
    return PyObject_CallFunctionObjArgs(g_py_encode, meta, arrays, args[2], NULL);
}

/* The fast decode of a frame body. Returns a new Message, or NULL with NO exception set when the
 * reference decoder must handle the body (or NULL with an exception for a real failure like no memory). */
static PyObject *fast_decode(Py_ssize_t n_arrays, Py_ssize_t meta_len, PyObject *body, const char *data,
                             Py_ssize_t len, int readonly, PyObject *peer) {
    if (meta_len > len) return NULL;
    rd_t rd = {(const unsigned char *)data, (const unsigned char *)data + meta_len};
    PyObject *pair = mp_read(&rd, 0);
    if (pair == NULL) return NULL;  /* with an exception only for no memory */
    if (rd.p != rd.end) {  /* trailing bytes: the reference names the fault */
        Py_DECREF(pair);
        return NULL;
    }
    PyObject *meta, *descr, *arrays = NULL, *base = NULL, *msg = NULL;
    if (!PyList_CheckExact(pair) || PyList_GET_SIZE(pair) != 2) goto fallback;
    meta = PyList_GET_ITEM(pair, 0);
    descr = PyList_GET_ITEM(pair, 1);
    if (!PyDict_CheckExact(meta) || !PyList_CheckExact(descr) || PyList_GET_SIZE(descr) != n_arrays) goto fallback;
    arrays = PyList_New(n_arrays);
    if (arrays == NULL) goto error;
    Py_ssize_t offset = meta_len;
    for (Py_ssize_t i = 0; i < n_arrays; i++) {
        PyObject *d = PyList_GET_ITEM(descr, i);
        if (!PyList_CheckExact(d) || PyList_GET_SIZE(d) != 2) goto fallback;
        PyObject *ds = PyList_GET_ITEM(d, 0), *shape = PyList_GET_ITEM(d, 1);
        if (!PyUnicode_CheckExact(ds) || !PyList_CheckExact(shape)) goto fallback;
        PyObject *dtype = PyDict_GetItemWithError(g_dtypes, ds);  /* borrowed */
        if (dtype == NULL) {
            if (PyErr_Occurred()) goto error;
            goto fallback;  /* first sight of this dtype: the reference checks and caches it */
        }
        if (!PyArray_DescrCheck(dtype)) goto fallback;
        Py_ssize_t nd = PyList_GET_SIZE(shape);
        if (nd > g_max_dims) goto fallback;
        npy_intp dims[NPY_MAXDIMS];
        Py_ssize_t itemsize = PyDataType_ELSIZE((PyArray_Descr *)dtype);
        if (itemsize <= 0) goto fallback;
        Py_ssize_t room = len - offset, count = 1;
        for (Py_ssize_t k = 0; k < nd; k++) {
            PyObject *v = PyList_GET_ITEM(shape, k);
            if (!PyLong_CheckExact(v)) goto fallback;
            int overflow = 0;
            long long dim = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow || dim < 0 || dim > PY_SSIZE_T_MAX) goto fallback;
            dims[k] = (npy_intp)dim;
            if (dim == 0) {
                count = 0;
            } else if (count != 0) {
                if (count > room / dim) goto fallback;  /* more than the frame can hold */
                count *= dim;
            }
        }
        if (count > room / itemsize) goto fallback;
        Py_ssize_t nbytes = count * itemsize;
        if (base == NULL) {
            base = PyMemoryView_FromObject(body);  /* holds a buffer export while the arrays live */
            if (base == NULL) goto error;
        }
        Py_INCREF(dtype);  /* stolen by NewFromDescr */
        PyObject *a = PyArray_NewFromDescr(&PyArray_Type, (PyArray_Descr *)dtype, (int)nd, dims, NULL,
                                           (void *)(data + offset),
                                           readonly ? NPY_ARRAY_CARRAY_RO : NPY_ARRAY_CARRAY, NULL);
        if (a == NULL) {
            /* e.g. shape [0, 2**40, 2**40]: no bytes, yet more elements than numpy can index. Only running
             * out of memory is an error of ours; the reference refuses the frame by name. */
            if (PyErr_ExceptionMatches(PyExc_MemoryError)) goto error;
            PyErr_Clear();
            goto fallback;
        }
        if (PyArray_SetBaseObject((PyArrayObject *)a, Py_NewRef(base)) < 0) {
            Py_DECREF(a);
            goto error;
        }
        PyList_SET_ITEM(arrays, i, a);
        offset += nbytes;
    }
    if (offset != len) goto fallback;
    msg = new_message(meta, arrays, peer);
    Py_DECREF(pair);
    Py_DECREF(arrays);
    Py_XDECREF(base);
    return msg;
fallback:
    Py_DECREF(pair);
    Py_XDECREF(arrays);
    Py_XDECREF(base);
    return NULL;
error:
    Py_DECREF(pair);
    Py_XDECREF(arrays);
    Py_XDECREF(base);
    if (!PyErr_Occurred()) PyErr_NoMemory();
    else if (!PyErr_ExceptionMatches(PyExc_MemoryError)) PyErr_Clear();  /* the reference names the fault */
    return NULL;
}

/* decode_body(n_arrays, meta_len, body) -> Message */
static PyObject *w_decode_body(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decode_body(n_arrays, meta_len, body)");
        return NULL;
    }
    Py_ssize_t n_arrays = PyLong_AsSsize_t(args[0]);
    Py_ssize_t meta_len = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        goto slow;
    }
    PyObject *msg = fast_decode(n_arrays, meta_len, args[2], view.buf, view.len, view.readonly, NULL);
    PyBuffer_Release(&view);
    if (msg != NULL || PyErr_Occurred()) return msg;
slow:
    return PyObject_CallFunctionObjArgs(g_py_decode_body, args[0], args[1], args[2], NULL);
}

/* decode(frame, max_size) -> Message: a whole frame, header included. */
static PyObject *w_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return PyObject_Vectorcall(g_py_decode, args, (size_t)nargs, NULL);
    Py_ssize_t max_size = PyLong_AsSsize_t(args[1]);
    if (max_size == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        goto slow;
    }
    PyObject *msg = NULL;
    const unsigned char *h = view.buf;
    if (view.len >= HEADER_SIZE && memcmp(h, MAGIC, 4) == 0 && h[4] == (unsigned char)g_version) {
        Py_ssize_t n_arrays = (Py_ssize_t)h[6] | ((Py_ssize_t)h[7] << 8);
        uint64_t meta_len = get_u32(h + 8), body_len = get_u64(h + 12);
        if (meta_len <= body_len && body_len <= (uint64_t)(max_size - HEADER_SIZE)
            && body_len == (uint64_t)(view.len - HEADER_SIZE))
            msg = fast_decode(n_arrays, (Py_ssize_t)meta_len, args[0], (const char *)h + HEADER_SIZE,
                              (Py_ssize_t)body_len, view.readonly, NULL);
    }
    PyBuffer_Release(&view);
    if (msg != NULL || PyErr_Occurred()) return msg;
slow:
    return PyObject_CallFunctionObjArgs(g_py_decode, args[0], args[1], NULL);
}

/* Decode whole, valid frames from buf[start:end], appending Messages to ready; return the new start or -1 with
 * an exception. Stops at an incomplete frame or at one the reference must look at. */
static Py_ssize_t parse_into(PyObject *buf, Py_ssize_t start, Py_ssize_t end, Py_ssize_t max_size, PyObject *peer,
                             PyObject *ready) {
    while (end - start >= HEADER_SIZE) {
        if (end > PyByteArray_GET_SIZE(buf)) break;  /* resized by someone else's code: leave it to Python */
        const unsigned char *h = (const unsigned char *)PyByteArray_AS_STRING(buf) + start;
        if (memcmp(h, MAGIC, 4) != 0 || h[4] != (unsigned char)g_version) break;
        Py_ssize_t n_arrays = (Py_ssize_t)h[6] | ((Py_ssize_t)h[7] << 8);
        uint64_t meta_len = get_u32(h + 8);
        uint64_t body_len = get_u64(h + 12);
        if (meta_len > body_len || body_len > (uint64_t)(max_size - HEADER_SIZE)) break;
        if ((uint64_t)(end - start - HEADER_SIZE) < body_len) break;  /* not whole yet */
        PyObject *body = PyByteArray_FromStringAndSize((const char *)h + HEADER_SIZE, (Py_ssize_t)body_len);
        if (body == NULL) return -1;
        PyObject *msg = fast_decode(n_arrays, (Py_ssize_t)meta_len, body, PyByteArray_AS_STRING(body),
                                    (Py_ssize_t)body_len, 0, peer);
        Py_DECREF(body);
        if (msg == NULL) {
            if (PyErr_Occurred()) return -1;
            break;  /* the reference decodes this one (or names its fault) */
        }
        PyObject *r = PyObject_CallMethodOneArg(ready, s_append, msg);
        Py_DECREF(msg);
        if (r == NULL) return -1;
        Py_DECREF(r);
        start += HEADER_SIZE + (Py_ssize_t)body_len;
    }
    return start;
}

/* parse_frames(buf, start, end, max_size, peer, ready) -> new start
 *
 * Decodes whole, valid frames from buf[start:end] and appends their Messages (peer set) to ``ready``.
 * Stops at the first frame that is incomplete or that the reference must look at (bad header, bad body,
 * new dtype); the caller's Python loop carries on from the returned offset. */
static PyObject *w_parse_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyByteArray_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "parse_frames(bytearray, start, end, max_size, peer, ready)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (start < 0 || end > PyByteArray_GET_SIZE(args[0]) || start > end) {
        PyErr_SetString(PyExc_ValueError, "parse_frames: start/end outside the buffer");
        return NULL;
    }
    start = parse_into(args[0], start, end, max_size, args[4], args[5]);
    return start < 0 ? NULL : PyLong_FromSsize_t(start);
}

/* read_frames(fd, buf, start, end, max_size, peer, ready, timeout_ms, listen_fd, spin_ns=0)
 *     -> (start, end, nread, errno)
 *
 * The receive path of a TCP subscription with one plain connection, in one call: wait up to timeout_ms
 * (GIL released; -1 = no limit, 0 = do not wait) for the connection or the listening socket to be readable
 * (a new connection returns at once with nothing read, for the caller's general path to accept it),
 * read what the kernel holds into buf[end:], and decode the whole frames. nread is the byte count (0 = the
 * peer closed), -1 when nothing was read (nothing arrived, or only the listener is ready); errno is
 * non-zero when the read failed. The caller's Python code handles everything else from (start, end). */
static PyObject *w_read_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 9 || nargs > 10 || !PyByteArray_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "read_frames(fd, bytearray, start, end, max_size, peer, ready, timeout_ms, "
                                         "listen_fd, spin_ns=0)");
        return NULL;
    }
    int fd = as_int(args[0]);
    PyObject *buf = args[1];
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_size = PyLong_AsSsize_t(args[4]);
    int timeout_ms = as_int(args[7]);
    int listen_fd = as_int(args[8]);
    long long spin_ns = nargs > 9 ? PyLong_AsLongLong(args[9]) : 0;
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t size = PyByteArray_GET_SIZE(buf);
    if (start < 0 || end > size || start > end) {
        PyErr_SetString(PyExc_ValueError, "read_frames: start/end outside the buffer");
        return NULL;
    }
    if (end == size && start > 0) {  /* make room: move the partial frame to the front */
        char *b = PyByteArray_AS_STRING(buf);
        memmove(b, b + start, (size_t)(end - start));
        end -= start;
        start = 0;
    }
    Py_ssize_t nread = -1;
    int err = 0;
    if (end < size) {
        /* Hold a buffer export while the GIL is released: the bytearray cannot be resized under the read. */
        Py_buffer pin;
        if (PyObject_GetBuffer(buf, &pin, PyBUF_WRITABLE) < 0) return NULL;
        char *dst = (char *)pin.buf + end;
        size_t room = (size_t)(size - end);
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        if (timeout_ms == 0) {
            n = recv(fd, dst, room, MSG_DONTWAIT);
        } else {
            /* Spin first, briefly: a message that comes within spin_ns is read without the sleep and wake-up
             * (which cost the sender as much as the receiver); then sleep in poll. */
            n = -1;
            errno = EAGAIN;
            if (spin_ns > 0) {
                struct timespec t0, t;
                clock_gettime(CLOCK_MONOTONIC, &t0);
                for (;;) {
                    /* poll, not recv: tcp_poll reads the socket's state without its lock, so a spinning
                     * reader does not slow the sender down */
                    struct pollfd one = {fd, POLLIN, 0};
                    if (poll(&one, 1, 0) > 0) {
                        n = recv(fd, dst, room, MSG_DONTWAIT);
                        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) break;
                    }
                    clock_gettime(CLOCK_MONOTONIC, &t);
                    long long ns = (t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec);
                    if (ns >= spin_ns || (timeout_ms > 0 && ns >= timeout_ms * 1000000LL)) break;
                }
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                struct pollfd pf[2] = {{fd, POLLIN, 0}, {listen_fd, POLLIN, 0}};
                int k;
                do {
                    k = poll(pf, listen_fd >= 0 ? 2 : 1, timeout_ms);
                } while (k < 0 && errno == EINTR);
                n = -1;
                errno = EAGAIN;
                if (k > 0 && pf[0].revents) n = recv(fd, dst, room, MSG_DONTWAIT);
            }
        }
        if (n < 0) err = errno;
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&pin);
        if (n >= 0) {
            nread = n;
            end += n;
            err = 0;
        } else if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) {
            err = 0;
        }
    }
    if (nread > 0) {
        start = parse_into(buf, start, end, max_size, args[5], args[6]);
        if (start < 0) return NULL;
    }
    return Py_BuildValue("nnni", start, end, nread, err);
}

/* send_frame(fd, meta, arrays, max_size) -> int | (parts, sent)
 *
 * The offer path of a plain TCP publication with nothing queued: encode and send in one call (the send with
 * the GIL released, on a non-blocking socket). Returns the frame's size when the kernel took all of it;
 * otherwise (parts, sent): the frame's buffers and how many bytes went (0..size-1, or -1 with errno in
 * the caller's hands: the send failed), for the caller to queue or report. */
static PyObject *w_send_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send_frame(fd, meta, arrays, max_size)");
        return NULL;
    }
    int fd = as_int(args[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    PyObject *parts = w_encode(self, args + 1, 3);
    if (parts == NULL) return NULL;
    if (PyList_GET_SIZE(parts) == 1 && PyBytes_CheckExact(PyList_GET_ITEM(parts, 0))) {
        PyObject *frame = PyList_GET_ITEM(parts, 0);
        const char *p = PyBytes_AS_STRING(frame);
        size_t len = (size_t)PyBytes_GET_SIZE(frame);
        ssize_t n;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        do {
            n = send(fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n < 0) err = errno;
        Py_END_ALLOW_THREADS
        if (n == (ssize_t)len) {
            Py_DECREF(parts);
            return PyLong_FromSsize_t(n);
        }
        if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) n = 0;
        PyObject *r = Py_BuildValue("(Nn)", parts, (Py_ssize_t)n);
        if (n < 0) errno = err;
        return r;
    }
    return Py_BuildValue("(Nn)", parts, (Py_ssize_t)0);  /* large: the caller's sendmsg takes the buffers */
}

static PyMethodDef methods[] = {
    {"init", w_init, METH_VARARGS,
     "init(Message, dtypes, py_encode, py_decode_body, py_decode, version, join_below)"},
    {"decode", (PyCFunction)(void (*)(void))w_decode, METH_FASTCALL, "decode(frame, max_size) -> Message"},
    {"encode", (PyCFunction)(void (*)(void))w_encode, METH_FASTCALL, "encode(meta, arrays, max_size) -> buffers"},
    {"decode_body", (PyCFunction)(void (*)(void))w_decode_body, METH_FASTCALL,
     "decode_body(n_arrays, meta_len, body) -> Message"},
    {"parse_frames", (PyCFunction)(void (*)(void))w_parse_frames, METH_FASTCALL,
     "parse_frames(buf, start, end, max_size, peer, ready) -> offset after the last frame decoded"},
    {"read_frames", (PyCFunction)(void (*)(void))w_read_frames, METH_FASTCALL,
     "read_frames(fd, buf, start, end, max_size, peer, ready, timeout_ms, listen_fd, spin_ns=0) "
     "-> (start, end, nread, errno)"},
    {"send_frame", (PyCFunction)(void (*)(void))w_send_frame, METH_FASTCALL,
     "send_frame(fd, meta, arrays, max_size) -> size sent, or (parts, bytes sent) for the caller to finish"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire", "Native fast paths of the wire format.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__wire(void) {
    import_array();
    s_append = PyUnicode_InternFromString("append");
    g_empty_str = PyUnicode_FromString("");
    if (s_append == NULL || g_empty_str == NULL) return NULL;
    return PyModule_Create(&module);
}
