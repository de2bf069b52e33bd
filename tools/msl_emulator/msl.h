// The Metal Shading Language subset, in C++17, for running Metal kernels on Linux.
//
// Threads of a threadgroup are cooperative fibers (ucontext): a barrier or a SIMD-group
// op suspends the fiber until every live thread it concerns has arrived, so barriers
// and 32-wide SIMD-group ops behave as on an Apple GPU. Device and constant buffers are
// reached only through msl::dptr / msl::cptr, which bounds-checks every access (naming the buffer and
// index) and counts the bytes loaded through const (input) buffers.
//
// Built with MSL_COUNT (the emulator's counting build) it also counts ALU work: the kernel's
// `float` and `uint` become msl_float / msl_uint, wrappers that do the same arithmetic and
// add one to msl::g_alu per operation a GPU lane issues for it (rules at "ALU counting"),
// and it records which bytes of each input buffer were read (msl::BufInfo::unique).
#pragma once
#include <cstdint>
#include <cstddef>
#include <cstring>
#include <cstdio>
#include <limits>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <vector>
#include <ucontext.h>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef _Float16 float16_t;

// ---------------------------------------------------------------- ALU counting
// One count per operation a GPU lane issues, on the types a kernel computes with:
// - msl_float (the kernel's `float`): + - * / fma, comparisons, math functions (1 each;
//   the cost of a transcendental is not modelled); negation, abs and width conversions
//   (half/bfloat <-> float) are free source modifiers; uint -> float conversion 1.
// - msl_uint (the kernel's `uint`): + - * / % & | ^ << >> ~, comparisons, ++/--,
//   extract_bits/insert_bits (one bitfield instruction), float -> uint conversion: 1 each.
// - bfloat arithmetic 1; vectors count per element; SIMD-group reductions and prefix ops
//   10 per element (5 shuffle + add steps), shuffles/broadcasts/votes 1 per element, an
//   8x8 simdgroup multiply-accumulate 16 per lane (512 FMAs over 32 lanes).
// Not counted: signed and 8/16/64-bit integers (by convention a kernel's index and loop
// arithmetic, which a GPU compiler unrolls or folds into addresses), half arithmetic,
// loads/stores, select and ?:. Arithmetic done at compile time (constexpr) is not counted.
namespace msl {
inline unsigned long long g_alu = 0;
constexpr void count(unsigned long long n = 1) {
  if (!__builtin_is_constant_evaluated()) g_alu += n;
}
}  // namespace msl
#if MSL_COUNT
struct msl_float;
struct msl_uint;
#else
typedef float msl_float;
typedef unsigned int msl_uint;
#endif

// ---------------------------------------------------------------- bfloat16
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  static uint16_t from_float(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                          // RNE
    return uint16_t(u >> 16);
  }
  template <class F, class = std::enable_if_t<std::is_arithmetic<F>::value || std::is_same<F, msl_float>::value>>
  bfloat16_t(F f) : bits(from_float(float(f))) {}
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
typedef bfloat16_t bfloat;
#define MSL_BF_OP(op) \
  inline bfloat16_t operator op(bfloat16_t a, bfloat16_t b) { msl::count(); return bfloat16_t(float(a) op float(b)); } \
  inline bfloat16_t& operator op##=(bfloat16_t& a, bfloat16_t b) { a = a op b; return a; }
MSL_BF_OP(+) MSL_BF_OP(-) MSL_BF_OP(*) MSL_BF_OP(/)
#undef MSL_BF_OP
inline bfloat16_t operator-(bfloat16_t a) { return bfloat16_t(-float(a)); }
#define MSL_BF_CMP(op) inline bool operator op(bfloat16_t a, bfloat16_t b) { msl::count(); return float(a) op float(b); }
MSL_BF_CMP(<) MSL_BF_CMP(>) MSL_BF_CMP(<=) MSL_BF_CMP(>=) MSL_BF_CMP(==) MSL_BF_CMP(!=)
#undef MSL_BF_CMP

#if MSL_COUNT
// ---------------------------------------------------------------- counted float and uint
// Same layout and arithmetic as float / unsigned (results are bit for bit those of the
// plain build); conversions from native numbers are implicit, as in MSL. A ?: whose arms
// mix a counted type with a native one (n ? x : 0) is ambiguous in C++: write both arms
// in one type.
namespace msl {
template <class S> struct is_native : std::integral_constant<bool, std::is_arithmetic<S>::value || std::is_same<S, _Float16>::value> {};
}  // namespace msl
struct msl_uint {
  unsigned v;
  msl_uint() = default;
  template <class I, std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value, int> = 0>
  constexpr msl_uint(I x) : v(unsigned(x)) {}
  template <class F, std::enable_if_t<msl::is_native<F>::value && !std::is_integral<F>::value, int> = 0>
  constexpr msl_uint(F x) : v(unsigned(x)) { msl::count(); }
  msl_uint(bfloat16_t x) : v(unsigned(float(x))) { msl::count(); }
  explicit constexpr msl_uint(const msl_float& x);
  constexpr operator unsigned() const { return v; }
};
struct msl_float {
  float v;
  msl_float() = default;
  constexpr msl_float(float x) : v(x) {}
  template <class S, std::enable_if_t<msl::is_native<S>::value && !std::is_same<S, float>::value, int> = 0>
  constexpr msl_float(S x) : v(float(x)) {}
  msl_float(bfloat16_t x) : v(float(x)) {}
  constexpr msl_float(msl_uint x) : v(float(x.v)) { msl::count(); }
  constexpr operator float() const { return v; }
};
constexpr msl_uint::msl_uint(const msl_float& x) : v(unsigned(x.v)) { msl::count(); }
namespace msl {
// The result of a mixed operation in the counted type where C++ would give float / unsigned.
template <class R> constexpr auto wrap(R r) {
  if constexpr (std::is_same<R, float>::value) return msl_float(r);
  else if constexpr (std::is_same<R, unsigned>::value) return msl_uint(r);
  else return r;
}
template <class S> constexpr unsigned long long cvt() { return std::is_integral<S>::value ? 0 : 1; }
}  // namespace msl
#define MSL_CT_OP(W, op, MIXED_COST)                                                               \
  constexpr auto operator op(W a, W b) { msl::count(); return msl::wrap(a.v op b.v); }             \
  template <class S, std::enable_if_t<msl::is_native<S>::value, int> = 0>                          \
  constexpr auto operator op(W a, S b) { msl::count(1 + MIXED_COST); return msl::wrap(a.v op b); } \
  template <class S, std::enable_if_t<msl::is_native<S>::value, int> = 0>                          \
  constexpr auto operator op(S a, W b) { msl::count(1 + MIXED_COST); return msl::wrap(a op b.v); }
#define MSL_CT_CMP(W, op)                                                                     \
  constexpr bool operator op(W a, W b) { msl::count(); return a.v op b.v; }                   \
  template <class S, std::enable_if_t<msl::is_native<S>::value, int> = 0>                     \
  constexpr bool operator op(W a, S b) { msl::count(); return a.v op b; }                     \
  template <class S, std::enable_if_t<msl::is_native<S>::value, int> = 0>                     \
  constexpr bool operator op(S a, W b) { msl::count(); return a op b.v; }
#define MSL_CT_ASSIGN(W, op)                                                                  \
  template <class S> constexpr W& operator op##=(W& a, const S& b) { a = W(a op b); return a; }
// msl_uint with a native float counts the conversion too (msl::cvt)
#define MSL_U_OP(op) MSL_CT_OP(msl_uint, op, msl::cvt<S>()) MSL_CT_ASSIGN(msl_uint, op)
MSL_U_OP(+) MSL_U_OP(-) MSL_U_OP(*) MSL_U_OP(/)
#undef MSL_U_OP
#define MSL_U_BITOP(op) MSL_CT_OP(msl_uint, op, 0) MSL_CT_ASSIGN(msl_uint, op)
MSL_U_BITOP(%) MSL_U_BITOP(&) MSL_U_BITOP(|) MSL_U_BITOP(^) MSL_U_BITOP(<<) MSL_U_BITOP(>>)
#undef MSL_U_BITOP
#define MSL_F_OP(op) MSL_CT_OP(msl_float, op, 0) MSL_CT_ASSIGN(msl_float, op) \
  constexpr msl_float operator op(msl_float a, msl_uint b) { msl::count(2); return a.v op float(b.v); } \
  constexpr msl_float operator op(msl_uint a, msl_float b) { msl::count(2); return float(a.v) op b.v; }
MSL_F_OP(+) MSL_F_OP(-) MSL_F_OP(*) MSL_F_OP(/)
#undef MSL_F_OP
#define MSL_CMPS(W) MSL_CT_CMP(W, <) MSL_CT_CMP(W, >) MSL_CT_CMP(W, <=) MSL_CT_CMP(W, >=) MSL_CT_CMP(W, ==) MSL_CT_CMP(W, !=)
MSL_CMPS(msl_uint) MSL_CMPS(msl_float)
#undef MSL_CMPS
#undef MSL_CT_OP
#undef MSL_CT_CMP
#undef MSL_CT_ASSIGN
constexpr msl_float operator-(msl_float a) { return -a.v; }
constexpr msl_float operator+(msl_float a) { return a; }
constexpr msl_uint operator-(msl_uint a) { msl::count(); return -a.v; }
constexpr msl_uint operator~(msl_uint a) { msl::count(); return ~a.v; }
constexpr msl_uint operator+(msl_uint a) { return a; }
#define MSL_CT_INC(W)                                                        \
  constexpr W& operator++(W& a) { msl::count(); a.v += 1; return a; }        \
  constexpr W& operator--(W& a) { msl::count(); a.v -= 1; return a; }        \
  constexpr W operator++(W& a, int) { W t = a; ++a; return t; }              \
  constexpr W operator--(W& a, int) { W t = a; --a; return t; }
MSL_CT_INC(msl_uint) MSL_CT_INC(msl_float)
#undef MSL_CT_INC
#endif
namespace msl {
// A scalar a vector can be filled with (the counted types are classes).
template <class S> struct scalar_like : std::integral_constant<bool, !std::is_class<S>::value || std::is_same<S, msl_float>::value || std::is_same<S, msl_uint>::value> {};
}  // namespace msl

// ---------------------------------------------------------------- vectors
template <class T, int N> struct vec;
template <class T, int N, int... I> struct swz {
  T d[N];
  operator vec<T, sizeof...(I)>() const { return vec<T, sizeof...(I)>(d[I]...); }
  swz& operator=(const vec<T, sizeof...(I)>& v) { int k = 0; ((d[I] = v[k++]), ...); return *this; }
};

#define MSL_VEC_COMMON(N)                                                              \
  vec() = default;                                                                    \
  template <class S, class = std::enable_if_t<std::is_convertible<S, T>::value && msl::scalar_like<S>::value>> \
  vec(S s) { for (int i = 0; i < N; i++) (*this)[i] = T(s); }                            \
  vec(bfloat16_t s) { for (int i = 0; i < N; i++) (*this)[i] = T(float(s)); }              \
  template <class U> explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; i++) (*this)[i] = static_cast<T>(o[i]); } \
  T& operator[](int i) { return (&x)[i]; }                                            \
  const T& operator[](int i) const { return (&x)[i]; }

template <class T> struct vec<T, 2> {
  union { struct { T x, y; }; struct { T r, g; };
    @SWIZZLES_2@ };
  MSL_VEC_COMMON(2)
  vec(T a, T b) { x = a; y = b; }
};
template <class T> struct vec<T, 3> {
  union { struct { T x, y, z; }; struct { T r, g, b; }; T _pad[4];
    @SWIZZLES_3@ };
  MSL_VEC_COMMON(3)
  vec(T a, T b, T c) { x = a; y = b; z = c; }
  vec(vec<T, 2> a, T c) { x = a.x; y = a.y; z = c; }
  vec(T a, vec<T, 2> b) { x = a; y = b.x; z = b.y; }
};
template <class T> struct vec<T, 4> {
  union { struct { T x, y, z, w; }; struct { T r, g, b, a; };
    @SWIZZLES_4@ };
  MSL_VEC_COMMON(4)
  vec(T a, T b, T c, T d) { x = a; y = b; z = c; w = d; }
  vec(vec<T, 2> a, vec<T, 2> b) { x = a.x; y = a.y; z = b.x; w = b.y; }
  vec(vec<T, 3> a, T d) { x = a.x; y = a.y; z = a.z; w = d; }
  vec(T a, vec<T, 3> b) { x = a; y = b.x; z = b.y; w = b.z; }
  vec(vec<T, 2> a, T c, T d) { x = a.x; y = a.y; z = c; w = d; }
  vec(T a, T b, vec<T, 2> c) { x = a; y = b; z = c.x; w = c.y; }
};
// Metal's packed vectors: no padding, same element access.
template <class T, int N> struct packed_vec {
  T d[N];
  T& operator[](int i) { return d[i]; }
  const T& operator[](int i) const { return d[i]; }
  operator vec<T, N>() const { vec<T, N> v; for (int i = 0; i < N; i++) v[i] = d[i]; return v; }
  packed_vec() = default;
  packed_vec(const vec<T, N>& v) { for (int i = 0; i < N; i++) d[i] = v[i]; }
};

template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<vec<T, N>> : std::true_type {};
template <class T, int N, int... I> struct is_vec<swz<T, N, I...>> : std::true_type {};  // not a scalar

#define MSL_VEC_BINOP(op)                                                                       \
  template <class T, int N> vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {    \
    vec<T, N> r; for (int i = 0; i < N; i++) r[i] = T(a[i] op b[i]); return r; }                \
  template <class T, int N, class S, class = std::enable_if_t<!is_vec<S>::value>>               \
  vec<T, N> operator op(const vec<T, N>& a, S b) { return a op vec<T, N>(T(b)); }               \
  template <class T, int N, class S, class = std::enable_if_t<!is_vec<S>::value>>               \
  vec<T, N> operator op(S a, const vec<T, N>& b) { return vec<T, N>(T(a)) op b; }               \
  template <class T, int N, class S> vec<T, N>& operator op##=(vec<T, N>& a, const S& b) { a = a op b; return a; }
MSL_VEC_BINOP(+) MSL_VEC_BINOP(-) MSL_VEC_BINOP(*) MSL_VEC_BINOP(/) MSL_VEC_BINOP(%)
MSL_VEC_BINOP(&) MSL_VEC_BINOP(|) MSL_VEC_BINOP(^) MSL_VEC_BINOP(<<) MSL_VEC_BINOP(>>)
#undef MSL_VEC_BINOP
// Arithmetic on a swizzle (q.xyz * 2.0f) goes through the vector it names.
#define MSL_SWZ_BINOP(op)                                                                       \
  template <class T, int N, int... I, class S>                                                  \
  auto operator op(const swz<T, N, I...>& a, const S& b) { return vec<T, sizeof...(I)>(a) op b; } \
  template <class T, int N, int... I, class S, class = std::enable_if_t<!std::is_same<S, swz<T, N, I...>>::value>> \
  auto operator op(const S& a, const swz<T, N, I...>& b) { return a op vec<T, sizeof...(I)>(b); }
#define MSL_SWZ_BINOP2(op) \
  template <class T, int N, int... I, int M, int... J>                                          \
  auto operator op(const swz<T, N, I...>& a, const swz<T, M, J...>& b) { return vec<T, sizeof...(I)>(a) op vec<T, sizeof...(J)>(b); }
MSL_SWZ_BINOP2(+) MSL_SWZ_BINOP2(-) MSL_SWZ_BINOP2(*) MSL_SWZ_BINOP2(/)
#undef MSL_SWZ_BINOP2
MSL_SWZ_BINOP(+) MSL_SWZ_BINOP(-) MSL_SWZ_BINOP(*) MSL_SWZ_BINOP(/)
#undef MSL_SWZ_BINOP
template <class T, int N> vec<T, N> operator-(const vec<T, N>& a) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = -a[i]; return r; }
template <class T, int N> vec<T, N> operator~(const vec<T, N>& a) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = ~a[i]; return r; }
#define MSL_VEC_CMP(op)                                                                          \
  template <class T, int N> vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {  \
    vec<bool, N> r; for (int i = 0; i < N; i++) r[i] = a[i] op b[i]; return r; }                 \
  template <class T, int N, class S, class = std::enable_if_t<!is_vec<S>::value>>                \
  vec<bool, N> operator op(const vec<T, N>& a, S b) { return a op vec<T, N>(T(b)); }
MSL_VEC_CMP(<) MSL_VEC_CMP(>) MSL_VEC_CMP(<=) MSL_VEC_CMP(>=) MSL_VEC_CMP(==) MSL_VEC_CMP(!=)
#undef MSL_VEC_CMP

#define MSL_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4; \
  typedef packed_vec<T, 2> packed_##name##2; typedef packed_vec<T, 3> packed_##name##3; \
  typedef packed_vec<T, 4> packed_##name##4;
MSL_VEC_TYPES(msl_float, float) MSL_VEC_TYPES(half, half) MSL_VEC_TYPES(bfloat16_t, bfloat)
MSL_VEC_TYPES(int, int) MSL_VEC_TYPES(msl_uint, uint) MSL_VEC_TYPES(short, short)
MSL_VEC_TYPES(ushort, ushort) MSL_VEC_TYPES(char, char) MSL_VEC_TYPES(uchar, uchar)
MSL_VEC_TYPES(bool, bool) MSL_VEC_TYPES(long, long) MSL_VEC_TYPES(ulong, ulong)
#undef MSL_VEC_TYPES

// ---------------------------------------------------------------- device buffers
namespace msl {
struct BufInfo {
  const char* name;
  char* base;
  size_t bytes;
  size_t itemsize;
  uint64_t loaded;
  uint8_t* seen;    // counting build: one bit per byte read at least once (input buffers)
  uint64_t unique;  // bytes with their bit set
};
inline BufInfo* g_bufs = nullptr;
inline int g_nbufs = 0;

[[noreturn]] inline void oob(const BufInfo* b, const void* p, size_t n) {
  char msg[512];
  if (!b) {
    std::snprintf(msg, sizeof msg, "out-of-bounds: access at %p outside every buffer", p);
  } else {
    long long off = (long long)((const char*)p - b->base);
    std::snprintf(msg, sizeof msg,
                  "out-of-bounds access to buffer '%s': element %lld (byte offset %lld, %zu bytes) "
                  "but the buffer has %zu elements (%zu bytes)",
                  b->name, off >= 0 ? off / (long long)b->itemsize : off / (long long)b->itemsize - 1,
                  off, n, b->bytes / b->itemsize, b->bytes);
  }
  throw std::runtime_error(msg);
}
inline void mark_read(BufInfo* b, const void* p, size_t n) {
  size_t off = (size_t)((const char*)p - b->base);
  for (size_t k = off; k < off + n; k++) {
    uint8_t bit = uint8_t(1u << (k & 7));
    if (!(b->seen[k >> 3] & bit)) { b->seen[k >> 3] |= bit; b->unique++; }
  }
}
// An index or offset: an integer, or the counted uint.
template <class I> struct is_index : std::integral_constant<bool, std::is_integral<I>::value || std::is_enum<I>::value || std::is_same<I, msl_uint>::value> {};
inline BufInfo* find_buf(const void* p) {
  for (int i = 0; i < g_nbufs; i++)
    if ((const char*)p >= g_bufs[i].base && (const char*)p < g_bufs[i].base + g_bufs[i].bytes) return &g_bufs[i];
  return nullptr;
}

// A pointer into a device or constant buffer: bounds-checked, counts loads.
// AS: 0 device, 1 constant. Metal does not convert between address spaces; neither does this.
template <class T, int AS> struct aptr {
  T* p = nullptr;
  BufInfo* b = nullptr;
  aptr() = default;
  aptr(T* p_, BufInfo* b_) : p(p_), b(b_) {}
  aptr(std::nullptr_t) {}
  aptr(T* raw) : p(raw), b(find_buf(raw)) {}  // e.g. &x[i]: recover the buffer
  template <class U, class = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  aptr(const aptr<U, AS>& o) : p(o.p), b(o.b) {}
  template <class U, class = std::enable_if_t<!std::is_convertible<U*, T*>::value>, class = void>
  explicit aptr(const aptr<U, AS>& o) : p((T*)(o.p)), b(o.b) {}  // reinterpret (C-style cast)
  T& at(long long i) const {
    T* q = p + i;
    if (!b || (char*)q < b->base || (char*)(q + 1) > b->base + b->bytes) oob(b, q, sizeof(T));
    if (std::is_const<T>::value) {
      b->loaded += sizeof(T);
      if (b->seen) mark_read(b, q, sizeof(T));
    }
    return *q;
  }
  template <class I, class = std::enable_if_t<is_index<I>::value>>
  T& operator[](I i) const { return at((long long)i); }
  T& operator*() const { return at(0); }
  T* operator->() const { at(0); return p; }
  explicit operator bool() const { return p != nullptr; }
  template <class I, class = std::enable_if_t<is_index<I>::value>>
  aptr operator+(I i) const { return aptr(p + (long long)i, b); }
  template <class I, class = std::enable_if_t<is_index<I>::value>>
  aptr operator-(I i) const { return aptr(p - (long long)i, b); }
  ptrdiff_t operator-(const aptr& o) const { return p - o.p; }
  template <class I> aptr& operator+=(I i) { p += (long long)i; return *this; }
  template <class I> aptr& operator-=(I i) { p -= (long long)i; return *this; }
  aptr& operator++() { ++p; return *this; }
  aptr& operator--() { --p; return *this; }
  aptr operator++(int) { aptr t = *this; ++p; return t; }
  aptr operator--(int) { aptr t = *this; --p; return t; }
  bool operator==(const aptr& o) const { return p == o.p; }
  bool operator!=(const aptr& o) const { return p != o.p; }
  bool operator<(const aptr& o) const { return p < o.p; }
  bool operator>(const aptr& o) const { return p > o.p; }
  bool operator<=(const aptr& o) const { return p <= o.p; }
  bool operator>=(const aptr& o) const { return p >= o.p; }
};
template <class T, int AS, class I, class = std::enable_if_t<is_index<I>::value>>
aptr<T, AS> operator+(I i, const aptr<T, AS>& d) { return d + i; }
template <class T> using dptr = aptr<T, 0>;
template <class T> using cptr = aptr<T, 1>;

template <class To, class From> To ptr_cast(From f) {
  if constexpr (std::is_pointer<To>::value && std::is_pointer<From>::value) return reinterpret_cast<To>(f);
  else if constexpr (std::is_pointer<From>::value || std::is_pointer<To>::value) return (To)(f);
  else return To(f);
}

// ---------------------------------------------------------------- fibers
enum State { RUNNABLE, WAIT_SIMD, WAIT_BAR, DONE };
struct Thread {
  ucontext_t ctx;
  State state;
  int simd_kind;
  unsigned op_parity;
  vec<uint, 3> tpig, tpitg;
  uint tiitg, lane, sg;
};
struct Group {
  Thread* threads;
  int n;
  vec<uint, 3> tgpig, tptg, dtptg, tgpg, grid;
  alignas(16) unsigned char slots[32][2][32][64];  // [SIMD group][parity][lane][bytes]
  uint32_t mask[32][2];
};
inline Thread* cur = nullptr;
inline Group* grp = nullptr;
inline ucontext_t sched_ctx;

inline void yield(State s, int kind = 0) {
  Thread* t = cur;
  t->state = s;
  t->simd_kind = kind;
  swapcontext(&t->ctx, &sched_ctx);
}

// SIMD-group ops: deposit this lane's value, wait for the lanes of the SIMD group that
// reach an op of the same kind, then read theirs. Two slot buffers alternate so a lane
// that runs ahead to the next op does not overwrite values others still read.
template <class T> const unsigned char* simd_exchange(const T& v, int kind, uint32_t* mask_out) {
  static_assert(sizeof(T) <= 64, "simd op on a type wider than 64 bytes");
  Thread* t = cur;
  unsigned par = t->op_parity;
  std::memcpy(grp->slots[t->sg][par][t->lane], &v, sizeof(T));
  yield(WAIT_SIMD, kind);
  t->op_parity ^= 1u;
  *mask_out = grp->mask[t->sg][par];
  return &grp->slots[t->sg][par][0][0];
}
template <class T> inline T slot(const unsigned char* s, int l) { T v; std::memcpy(&v, s + 64 * l, sizeof(T)); return v; }
template <class T> struct width : std::integral_constant<int, 1> {};
template <class T, int N> struct width<vec<T, N>> : std::integral_constant<int, N> {};
// Charges a SIMD-group op its cost (see "ALU counting"): created after the exchange, it
// sets the count to its value then plus the cost, so the emulator's own arithmetic over
// the lanes' values is not counted as the kernel's.
struct charge {
  unsigned long long at, cost;
  ~charge() { g_alu = at + cost; }
};
}  // namespace msl

// ---------------------------------------------------------------- barriers
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
inline void threadgroup_barrier(mem_flags = mem_flags::mem_none) { msl::yield(msl::WAIT_BAR); }
inline void simdgroup_barrier(mem_flags = mem_flags::mem_none) { uint32_t m; msl::simd_exchange(0, 99, &m); }

// ---------------------------------------------------------------- SIMD-group functions
template <class T> inline T metal_max_(T a, T b);
template <class T> inline T metal_min_(T a, T b);
#define MSL_SIMD_REDUCE(fname, kind, init, combine)                                   \
  template <class T> T fname(T v) {                                                   \
    uint32_t m; const unsigned char* s = msl::simd_exchange(v, kind, &m);             \
    msl::charge c_{msl::g_alu, 10ull * msl::width<T>::value};                         \
    bool first = true; T acc{};                                                       \
    for (int l = 0; l < 32; l++) if (m >> l & 1u) {                                   \
      T o = msl::slot<T>(s, l); if (first) { acc = o; first = false; } else { combine; } } \
    return acc; }
MSL_SIMD_REDUCE(simd_sum, 1, 0, acc = acc + o)
MSL_SIMD_REDUCE(simd_product, 2, 1, acc = acc * o)
MSL_SIMD_REDUCE(simd_max, 3, 0, acc = metal_max_(acc, o))
MSL_SIMD_REDUCE(simd_min, 4, 0, acc = metal_min_(acc, o))
MSL_SIMD_REDUCE(simd_and, 5, 0, acc = acc & o)
MSL_SIMD_REDUCE(simd_or, 6, 0, acc = acc | o)
MSL_SIMD_REDUCE(simd_xor, 7, 0, acc = acc ^ o)
#undef MSL_SIMD_REDUCE
#define MSL_SIMD_PREFIX(fname, kind, inclusive, combine)                              \
  template <class T> T fname(T v) {                                                   \
    uint32_t m; const unsigned char* s = msl::simd_exchange(v, kind, &m);             \
    msl::charge c_{msl::g_alu, 10ull * msl::width<T>::value};                         \
    T acc = T(kind == 11 || kind == 13 ? 1 : 0); uint me = msl::cur->lane;            \
    for (uint l = 0; l < (inclusive ? me + 1 : me); l++) if (m >> l & 1u) { T o = msl::slot<T>(s, l); combine; } \
    return acc; }
MSL_SIMD_PREFIX(simd_prefix_inclusive_sum, 10, true, acc = acc + o)
MSL_SIMD_PREFIX(simd_prefix_inclusive_product, 11, true, acc = acc * o)
MSL_SIMD_PREFIX(simd_prefix_exclusive_sum, 12, false, acc = acc + o)
MSL_SIMD_PREFIX(simd_prefix_exclusive_product, 13, false, acc = acc * o)
#undef MSL_SIMD_PREFIX
// Reading a lane that is inactive or out of range is undefined in Metal; here it reads
// that lane's slot as deposited (or stale), like hardware returning garbage.
#define MSL_SIMD_SHUFFLE(fname, kind, src)                                           \
  template <class T, class I> T fname(T v, I d) {                                    \
    uint32_t m; const unsigned char* s = msl::simd_exchange(v, kind, &m);            \
    msl::count(msl::width<T>::value);                                                \
    int me = int(msl::cur->lane); int from = (src);                                  \
    if (from < 0 || from > 31 || !(m >> from & 1u)) return v;                        \
    return msl::slot<T>(s, from); }
MSL_SIMD_SHUFFLE(simd_shuffle, 20, int(d))
MSL_SIMD_SHUFFLE(simd_broadcast, 21, int(d))
MSL_SIMD_SHUFFLE(simd_shuffle_xor, 22, me ^ int(d))
MSL_SIMD_SHUFFLE(simd_shuffle_down, 23, me + int(d))
MSL_SIMD_SHUFFLE(simd_shuffle_up, 24, me - int(d))
MSL_SIMD_SHUFFLE(simd_shuffle_rotate_down, 25, (me + int(d)) & 31)
MSL_SIMD_SHUFFLE(simd_shuffle_rotate_up, 26, (me - int(d)) & 31)
#undef MSL_SIMD_SHUFFLE
template <class T, class I> T simd_shuffle_and_fill_down(T v, T fill, I d) {
  uint32_t m; const unsigned char* s = msl::simd_exchange(v, 27, &m);
  msl::count(msl::width<T>::value);
  int from = int(msl::cur->lane) + int(d);
  return from >= 32 ? fill : (m >> from & 1u) ? msl::slot<T>(s, from) : v;
}
template <class T, class I> T simd_shuffle_and_fill_up(T v, T fill, I d) {
  uint32_t m; const unsigned char* s = msl::simd_exchange(v, 29, &m);
  msl::count(msl::width<T>::value);
  int from = int(msl::cur->lane) - int(d);
  return from < 0 ? fill : (m >> from & 1u) ? msl::slot<T>(s, from) : v;
}
template <class T> T simd_broadcast_first(T v) {
  uint32_t m; const unsigned char* s = msl::simd_exchange(v, 28, &m);
  msl::count(msl::width<T>::value);
  for (int l = 0; l < 32; l++) if (m >> l & 1u) return msl::slot<T>(s, l);
  return v;
}
inline bool simd_all(bool v) { uint32_t m; auto s = msl::simd_exchange(v, 30, &m); msl::count(); for (int l = 0; l < 32; l++) if ((m >> l & 1u) && !msl::slot<bool>(s, l)) return false; return true; }
inline bool simd_any(bool v) { uint32_t m; auto s = msl::simd_exchange(v, 31, &m); msl::count(); for (int l = 0; l < 32; l++) if ((m >> l & 1u) && msl::slot<bool>(s, l)) return true; return false; }
struct simd_vote { uint64_t v; explicit simd_vote(uint64_t x) : v(x) {} operator uint64_t() const { return v; } bool all() const; bool any() const { return v != 0; } };
inline simd_vote simd_ballot(bool v) { uint32_t m; auto s = msl::simd_exchange(v, 32, &m); msl::count(); uint64_t r = 0; for (int l = 0; l < 32; l++) if ((m >> l & 1u) && msl::slot<bool>(s, l)) r |= 1ull << l; return simd_vote(r); }
inline simd_vote simd_active_threads_mask() { uint32_t m; msl::simd_exchange(true, 33, &m); return simd_vote(m); }
inline bool simd_is_first() { uint32_t m; msl::simd_exchange(true, 34, &m); for (int l = 0; l < 32; l++) if (m >> l & 1u) return msl::cur->lane == uint(l); return false; }
// quad-group shuffles use the same machinery, within 4 lanes
template <class T, class I> T quad_shuffle(T v, I d) { return simd_shuffle(v, (msl::cur->lane & ~3u) + (uint(d) & 3u)); }
template <class T, class I> T quad_shuffle_xor(T v, I d) { return simd_shuffle(v, msl::cur->lane ^ (uint(d) & 3u)); }
template <class T, class I> T quad_broadcast(T v, I d) { return simd_shuffle(v, (msl::cur->lane & ~3u) + (uint(d) & 3u)); }

// ---------------------------------------------------------------- simdgroup matrices
// An 8x8 matrix spread over the 32 lanes of a SIMD group, two elements per lane, in the
// layout MLX's steel kernels rely on: lane l holds row fm, columns fn and fn + 1 with
// qid = l / 4, fm = (qid & 4) + (l / 2) % 4, fn = (qid & 2) * 2 + (l % 2) * 2.
// Loads and stores move only the lane's own elements (so byte counts are faithful);
// multiply(-accumulate) gathers the operands of every lane of the SIMD group.
namespace msl {
inline int sgm_row(uint l) { uint q = l / 4; return int((q & 4) + (l / 2) % 4); }
inline int sgm_col(uint l) { uint q = l / 4; return int((q & 2) * 2 + (l % 2) * 2); }
}  // namespace msl
template <class T, int R, int C> struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "only 8x8 simdgroup matrices are emulated");
  vec<T, 2> e;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) {  // a diagonal matrix, as Metal's constructor
    int r = msl::sgm_row(msl::cur->lane), c = msl::sgm_col(msl::cur->lane);
    e[0] = r == c ? diag : T(0);
    e[1] = r == c + 1 ? diag : T(0);
  }
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};
template <class T, int R, int C> simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m; m.e = vec<T, 2>(v); return m;
}
#define MSL_SGM_TYPES(T, name) \
  typedef simdgroup_matrix<T, 8, 8> simdgroup_##name##8x8;
MSL_SGM_TYPES(msl_float, float) MSL_SGM_TYPES(half, half) MSL_SGM_TYPES(bfloat16_t, bfloat)
#undef MSL_SGM_TYPES
template <class T, class P, class S = ulong>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, P src, S stride = 8, vec<ulong, 2> origin = vec<ulong, 2>(0ul),
                    bool transpose = false) {
  int r = msl::sgm_row(msl::cur->lane), c = msl::sgm_col(msl::cur->lane);
  for (int i = 0; i < 2; i++) {
    long rr = transpose ? c + i : r, cc = transpose ? r : c + i;
    d.e[i] = T(src[(long)(origin.y + rr) * (long)stride + (long)origin.x + cc]);
  }
}
template <class T, class P, class S = ulong>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, P dst, S stride = 8, vec<ulong, 2> origin = vec<ulong, 2>(0ul),
                     bool transpose = false) {
  int r = msl::sgm_row(msl::cur->lane), c = msl::sgm_col(msl::cur->lane);
  for (int i = 0; i < 2; i++) {
    long rr = transpose ? c + i : r, cc = transpose ? r : c + i;
    dst[(long)(origin.y + rr) * (long)stride + (long)origin.x + cc] = a.e[i];
  }
}
namespace msl {
template <class TA, class TB, class TC> struct SgmOperands { vec<TA, 2> a; vec<TB, 2> b; vec<TC, 2> c; };
}
template <class TD, class TA, class TB, class TC>
void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c) {
  using Ops = msl::SgmOperands<TA, TB, TC>;
  uint32_t m;
  const unsigned char* s = msl::simd_exchange(Ops{a.e, b.e, c.e}, 40, &m);
  msl::charge c_{msl::g_alu, 16};
  float A[8][8] = {}, B[8][8] = {}, Cm[8][8] = {};
  for (int l = 0; l < 32; l++) {
    if (!(m >> l & 1u)) continue;
    Ops o = msl::slot<Ops>(s, l);
    int r = msl::sgm_row(l), col = msl::sgm_col(l);
    for (int i = 0; i < 2; i++) { A[r][col + i] = float(o.a[i]); B[r][col + i] = float(o.b[i]); Cm[r][col + i] = float(o.c[i]); }
  }
  int r = msl::sgm_row(msl::cur->lane), col = msl::sgm_col(msl::cur->lane);
  for (int i = 0; i < 2; i++) {
    float acc = Cm[r][col + i];
    for (int k = 0; k < 8; k++) acc = __builtin_fmaf(A[r][k], B[k][col + i], acc);
    d.e[i] = TD(acc);
  }
}
template <class TD, class TA, class TB>
void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a, const simdgroup_matrix<TB, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)));
}

// ---------------------------------------------------------------- atomics
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel, memory_order_seq_cst };
template <class T> struct atomic { T v; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
template <class T, class U> void atomic_store_explicit(atomic<T>* a, U v, memory_order) { a->v = T(v); }
template <class T> T atomic_load_explicit(const atomic<T>* a, memory_order) { return a->v; }
template <class T, class U> T atomic_exchange_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(v); return o; }
template <class T, class U> T atomic_fetch_add_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o + v); return o; }
template <class T, class U> T atomic_fetch_sub_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o - v); return o; }
template <class T, class U> T atomic_fetch_max_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; if (T(v) > o) a->v = T(v); return o; }
template <class T, class U> T atomic_fetch_min_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; if (T(v) < o) a->v = T(v); return o; }
template <class T, class U> T atomic_fetch_and_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o & T(v); return o; }
template <class T, class U> T atomic_fetch_or_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o | T(v); return o; }
template <class T, class U> T atomic_fetch_xor_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o ^ T(v); return o; }
template <class T, class U> bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired, memory_order, memory_order) {
  if (a->v == *expected) { a->v = T(desired); return true; } *expected = a->v; return false; }

// ---------------------------------------------------------------- metal:: math
namespace metal {
template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_integer = false;
  static half max() { return half(65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half lowest() { return half(-65504.0f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(__builtin_inff()); }
  static half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <> struct numeric_limits<bfloat16_t> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_integer = false;
  static bfloat16_t max() { return bfloat16_t(3.38953139e38f); }
  static bfloat16_t lowest() { return bfloat16_t(-3.38953139e38f); }
  static bfloat16_t infinity() { return bfloat16_t(__builtin_inff()); }
  static bfloat16_t quiet_NaN() { return bfloat16_t(__builtin_nanf("")); }
};
#if MSL_COUNT
template <> struct numeric_limits<msl_float> : std::numeric_limits<float> {};
template <> struct numeric_limits<msl_uint> : std::numeric_limits<unsigned> {};
#endif
using ::vec;

// Unary float functions, computed in float (double for double), applied per element of a vector.
#define MSL_UNARY(fname, expr)                                                          \
  inline float fname(float x) { return (expr); }                                        \
  inline half fname(half h) { float x = float(h); return half(expr); }                  \
  inline bfloat16_t fname(bfloat16_t h) { float x = float(h); return bfloat16_t(expr); } \
  template <class T, int N> vec<T, N> fname(const vec<T, N>& v) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = fname(v[i]); return r; }
MSL_UNARY(exp, __builtin_expf(x)) MSL_UNARY(exp2, __builtin_exp2f(x)) MSL_UNARY(exp10, __builtin_powf(10.0f, x))
MSL_UNARY(log, __builtin_logf(x)) MSL_UNARY(log2, __builtin_log2f(x)) MSL_UNARY(log10, __builtin_log10f(x))
MSL_UNARY(sqrt, __builtin_sqrtf(x)) MSL_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MSL_UNARY(sin, __builtin_sinf(x)) MSL_UNARY(cos, __builtin_cosf(x)) MSL_UNARY(tan, __builtin_tanf(x))
MSL_UNARY(asin, __builtin_asinf(x)) MSL_UNARY(acos, __builtin_acosf(x)) MSL_UNARY(atan, __builtin_atanf(x))
MSL_UNARY(sinh, __builtin_sinhf(x)) MSL_UNARY(cosh, __builtin_coshf(x)) MSL_UNARY(tanh, __builtin_tanhf(x))
MSL_UNARY(floor, __builtin_floorf(x)) MSL_UNARY(ceil, __builtin_ceilf(x)) MSL_UNARY(trunc, __builtin_truncf(x))
MSL_UNARY(round, __builtin_roundf(x)) MSL_UNARY(rint, __builtin_rintf(x)) MSL_UNARY(fabs, __builtin_fabsf(x))
MSL_UNARY(fract, x - __builtin_floorf(x)) MSL_UNARY(saturate, x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x))
MSL_UNARY(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f)) MSL_UNARY(erf, __builtin_erff(x))
MSL_UNARY(log1p, __builtin_log1pf(x)) MSL_UNARY(expm1, __builtin_expm1f(x))
#undef MSL_UNARY
#if MSL_COUNT
#define MSL_UNARY_C(fname, cost) inline msl_float fname(msl_float x) { msl::count(cost); return fname(x.v); }
MSL_UNARY_C(exp, 1) MSL_UNARY_C(exp2, 1) MSL_UNARY_C(exp10, 1) MSL_UNARY_C(log, 1) MSL_UNARY_C(log2, 1)
MSL_UNARY_C(log10, 1) MSL_UNARY_C(sqrt, 1) MSL_UNARY_C(rsqrt, 1) MSL_UNARY_C(sin, 1) MSL_UNARY_C(cos, 1)
MSL_UNARY_C(tan, 1) MSL_UNARY_C(asin, 1) MSL_UNARY_C(acos, 1) MSL_UNARY_C(atan, 1) MSL_UNARY_C(sinh, 1)
MSL_UNARY_C(cosh, 1) MSL_UNARY_C(tanh, 1) MSL_UNARY_C(floor, 1) MSL_UNARY_C(ceil, 1) MSL_UNARY_C(trunc, 1)
MSL_UNARY_C(round, 1) MSL_UNARY_C(rint, 1) MSL_UNARY_C(fabs, 0) MSL_UNARY_C(fract, 1) MSL_UNARY_C(saturate, 1)
MSL_UNARY_C(sign, 1) MSL_UNARY_C(erf, 1) MSL_UNARY_C(log1p, 1) MSL_UNARY_C(expm1, 1)
#undef MSL_UNARY_C
#endif
inline double exp(double x) { return __builtin_exp(x); }
inline double sqrt(double x) { return __builtin_sqrt(x); }
inline double log(double x) { return __builtin_log(x); }

template <class T> std::enable_if_t<std::is_integral<T>::value, T> abs(T x) { return x < 0 ? T(-x) : x; }
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return x < half(0) ? half(-x) : x; }
inline bfloat16_t abs(bfloat16_t x) { return bfloat16_t(__builtin_fabsf(float(x))); }
#if MSL_COUNT
inline msl_float abs(msl_float x) { return __builtin_fabsf(x.v); }  // a free source modifier
#endif
template <class T, int N> vec<T, N> abs(const vec<T, N>& v) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = abs(v[i]); return r; }

template <class T> inline T min_(T a, T b) { return b < a ? b : a; }
template <class T> inline T max_(T a, T b) { return a < b ? b : a; }
inline float min_(float a, float b) { return __builtin_fminf(a, b); }
inline float max_(float a, float b) { return __builtin_fmaxf(a, b); }
#if MSL_COUNT
inline msl_float min_(msl_float a, msl_float b) { msl::count(); return __builtin_fminf(a.v, b.v); }
inline msl_float max_(msl_float a, msl_float b) { msl::count(); return __builtin_fmaxf(a.v, b.v); }
#endif
template <class T> T min(T a, T b) { return min_(a, b); }
template <class T> T max(T a, T b) { return max_(a, b); }
template <class T> T fmin(T a, T b) { return min_(a, b); }
template <class T> T fmax(T a, T b) { return max_(a, b); }
template <class T, int N> vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = min_(a[i], b[i]); return r; }
template <class T, int N> vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = max_(a[i], b[i]); return r; }
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, int N> vec<T, N> clamp(const vec<T, N>& x, T lo, T hi) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = clamp(x[i], lo, hi); return r; }
template <class T> T mix(T x, T y, T a) { return x + (y - x) * a; }
template <class T> T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = c[i] ? b[i] : a[i]; return r; }
#define MSL_BINARY(fname, expr)                                                        \
  inline float fname(float x, float y) { return (expr); }                              \
  inline half fname(half a, half b) { float x = float(a), y = float(b); return half(expr); } \
  inline bfloat16_t fname(bfloat16_t a, bfloat16_t b) { float x = float(a), y = float(b); return bfloat16_t(expr); } \
  template <class T, int N> vec<T, N> fname(const vec<T, N>& a, const vec<T, N>& b) { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = fname(a[i], b[i]); return r; }
MSL_BINARY(pow, __builtin_powf(x, y)) MSL_BINARY(powr, __builtin_powf(x, y))
MSL_BINARY(fmod, __builtin_fmodf(x, y)) MSL_BINARY(atan2, __builtin_atan2f(x, y))
MSL_BINARY(copysign, __builtin_copysignf(x, y)) MSL_BINARY(divide, x / y)
MSL_BINARY(step, y < x ? 0.0f : 1.0f) MSL_BINARY(fdim, x > y ? x - y : 0.0f)
#undef MSL_BINARY
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
#if MSL_COUNT
#define MSL_BINARY_C(fname) inline msl_float fname(msl_float x, msl_float y) { msl::count(); return fname(x.v, y.v); }
MSL_BINARY_C(pow) MSL_BINARY_C(powr) MSL_BINARY_C(fmod) MSL_BINARY_C(atan2) MSL_BINARY_C(copysign)
MSL_BINARY_C(divide) MSL_BINARY_C(step) MSL_BINARY_C(fdim)
#undef MSL_BINARY_C
inline msl_float fma(msl_float a, msl_float b, msl_float c) { msl::count(); return __builtin_fmaf(a.v, b.v, c.v); }
#endif
// Bitfields (one instruction on Apple GPUs): bits [offset, offset + bits) of x, zero- or
// sign-extended; base with those bits replaced by the low bits of insert.
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
T extract_bits(T x, unsigned offset, unsigned bits) {
  using U = std::make_unsigned_t<T>;
  if (bits == 0) return T(0);
  U u = U(U(x) << (8 * sizeof(T) - offset - bits));
  return std::is_signed<T>::value ? T(T(u) >> (8 * sizeof(T) - bits)) : T(u >> (8 * sizeof(T) - bits));
}
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
T insert_bits(T base, T insert, unsigned offset, unsigned bits) {
  using U = std::make_unsigned_t<T>;
  U mask = bits >= 8 * sizeof(T) ? U(~U(0)) : U(U(U(1) << bits) - 1);
  return T((U(base) & U(~U(mask << offset))) | (U(U(insert) << offset) & U(mask << offset)));
}
#if MSL_COUNT
inline msl_uint extract_bits(msl_uint x, unsigned offset, unsigned bits) { msl::count(); return extract_bits(x.v, offset, bits); }
inline msl_uint insert_bits(msl_uint base, msl_uint insert, unsigned offset, unsigned bits) { msl::count(); return insert_bits(base.v, insert.v, offset, bits); }
#endif
template <class T> T min3(T a, T b, T c) { return min(min(a, b), c); }
template <class T> T max3(T a, T b, T c) { return max(max(a, b), c); }
template <class T> T fmin3(T a, T b, T c) { return min(min(a, b), c); }
template <class T> T fmax3(T a, T b, T c) { return max(max(a, b), c); }
template <class T> T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
template <int N> bool all(const vec<bool, N>& v) { for (int i = 0; i < N; i++) if (!v[i]) return false; return true; }
template <int N> bool any(const vec<bool, N>& v) { for (int i = 0; i < N; i++) if (v[i]) return true; return false; }
inline bool all(bool v) { return v; }
inline bool any(bool v) { return v; }
inline float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
template <class T> bool isnan(T x) { return __builtin_isnan(float(x)); }
template <class T> bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T> bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T> bool signbit(T x) { return __builtin_signbit(float(x)); }
template <class T, int N> T dot(const vec<T, N>& a, const vec<T, N>& b) { T s = T(0); for (int i = 0; i < N; i++) s += a[i] * b[i]; return s; }
template <class T, int N> T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }
template <class T, int N> vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }
template <class T> T popcount(T x) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); }
template <class T> T clz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll((unsigned long long)(std::make_unsigned_t<T>)x) - (64 - 8 * sizeof(T))); }
template <class T> T ctz(T x) { return x == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll((unsigned long long)x)); }
template <class T> T reverse_bits(T x) { T r = 0; for (unsigned i = 0; i < 8 * sizeof(T); i++) if (x >> i & 1) r |= T(1) << (8 * sizeof(T) - 1 - i); return r; }
template <class T> T mulhi(T a, T b) { return T(((__int128)a * (__int128)b) >> (8 * sizeof(T))); }
template <class To, class From> To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To t; std::memcpy(&t, &f, sizeof(To)); return t; }
namespace precise { using metal::divide; using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt; using metal::rsqrt; using metal::sin; using metal::cos; using metal::tanh; using metal::pow; using metal::fmin; using metal::fmax; using metal::abs; using metal::fabs; }
namespace fast { using metal::divide; using metal::exp; using metal::exp2; using metal::log; using metal::log2; using metal::sqrt; using metal::rsqrt; using metal::sin; using metal::cos; using metal::tanh; using metal::pow; using metal::fmin; using metal::fmax; using metal::abs; using metal::fabs; }
}  // namespace metal
// Everything above that Metal declares in namespace metal, reachable as metal::name too.
namespace metal {
using ::mem_flags; using ::threadgroup_barrier; using ::simdgroup_barrier;
using ::simd_sum; using ::simd_product; using ::simd_max; using ::simd_min; using ::simd_and;
using ::simd_or; using ::simd_xor; using ::simd_prefix_inclusive_sum; using ::simd_prefix_exclusive_sum;
using ::simd_prefix_inclusive_product; using ::simd_prefix_exclusive_product; using ::simd_shuffle;
using ::simd_broadcast; using ::simd_shuffle_xor; using ::simd_shuffle_down; using ::simd_shuffle_up;
using ::simd_shuffle_rotate_down; using ::simd_shuffle_rotate_up; using ::simd_shuffle_and_fill_down;
using ::simd_shuffle_and_fill_up; using ::simd_broadcast_first; using ::simd_all; using ::simd_any;
using ::simd_ballot; using ::simd_is_first; using ::quad_shuffle; using ::quad_shuffle_xor; using ::quad_broadcast;
using ::memory_order; using ::memory_order_relaxed; using ::atomic; using ::atomic_int; using ::atomic_uint;
using ::atomic_float; using ::atomic_store_explicit; using ::atomic_load_explicit; using ::atomic_exchange_explicit;
using ::atomic_fetch_add_explicit; using ::atomic_fetch_sub_explicit; using ::atomic_fetch_max_explicit;
using ::atomic_fetch_min_explicit; using ::atomic_fetch_and_explicit; using ::atomic_fetch_or_explicit;
using ::atomic_fetch_xor_explicit; using ::atomic_compare_exchange_weak_explicit;
using ::simdgroup_matrix; using ::simdgroup_float8x8; using ::simdgroup_half8x8; using ::simdgroup_bfloat8x8;
using ::simdgroup_load; using ::simdgroup_store; using ::simdgroup_multiply; using ::simdgroup_multiply_accumulate;
using ::make_filled_simdgroup_matrix;
}  // namespace metal
template <class T> inline T metal_max_(T a, T b) { return metal::max(a, b); }
template <class T> inline T metal_min_(T a, T b) { return metal::min(a, b); }
using namespace metal;
#define METAL_FUNC inline
#define INFINITY msl_float(__builtin_inff())
#define NAN msl_float(__builtin_nanf(""))
#define MAXFLOAT msl_float(3.40282347e38f)
#define FLT_MAX msl_float(3.40282347e38f)
#define FLT_MIN msl_float(1.17549435e-38f)
#define HALF_MAX msl_float(65504.0f)
#define M_PI_F msl_float(3.14159265358979323846f)
#define M_E_F msl_float(2.71828182845904523536f)
#define M_LN2_F msl_float(0.693147180559945309417f)
#define M_LOG2E_F msl_float(1.44269504088896340736f)
#define M_SQRT2_F msl_float(1.41421356237309504880f)

// What MLX prepends to every custom kernel (its utils preamble), in the parts kernels use.
template <class U> struct Limits {
  static inline const U max = metal::numeric_limits<U>::is_integer ? metal::numeric_limits<U>::max() : metal::numeric_limits<U>::infinity();
  static inline const U min = metal::numeric_limits<U>::is_integer ? metal::numeric_limits<U>::min() : U(-metal::numeric_limits<U>::infinity());
  static inline const U finite_max = metal::numeric_limits<U>::max();
  static inline const U finite_min = metal::numeric_limits<U>::is_integer ? metal::numeric_limits<U>::min() : U(-metal::numeric_limits<U>::max());
};
template <> struct Limits<bool> { static inline const bool max = true, min = false; };
template <class IdxT = int64_t, class E, class SP, class STP>
inline IdxT elem_to_loc(E elem, SP shape, STP strides, int ndim) {
  if constexpr (is_vec<E>::value) {  // (x, y, rest) as MLX's uint3 overload
    IdxT loc = IdxT(elem.x) * IdxT(strides[ndim - 1]) + IdxT(elem.y) * IdxT(strides[ndim - 2]);
    IdxT z = elem.z;
    for (int d = ndim - 3; d >= 0; --d) { loc += (z % shape[d]) * IdxT(strides[d]); z /= shape[d]; }
    return loc;
  } else {
    IdxT loc = 0, e = IdxT(elem);
    for (int i = ndim - 1; i >= 0; --i) { loc += (e % shape[i]) * IdxT(strides[i]); e /= shape[i]; }
    return loc;
  }
}
template <class STP> inline int64_t elem_to_loc_1(uint elem, STP stride) { return int64_t(elem) * int64_t(stride); }
template <class STP> inline int64_t elem_to_loc_2(vec<uint, 2> e, STP s) { return int64_t(e.x) * s[1] + int64_t(e.y) * s[0]; }
template <class STP> inline int64_t elem_to_loc_3(vec<uint, 3> e, STP s) { return int64_t(e.x) * s[2] + int64_t(e.y) * s[1] + int64_t(e.z) * s[0]; }
inline size_t ceildiv(size_t n, size_t m) { return (n + m - 1) / m; }
#define METAL_CONST_ARG(...)
#define METAL_PRAGMA_UNROLL _Pragma("GCC unroll 8")

// ---------------------------------------------------------------- the scheduler
namespace msl {
// Threadgroup memory is uninitialised on a GPU: each threadgroup finds its arrays filled
// with 0xFF bytes (NaN, -1), so a read of a slot no thread wrote is loud, not stale.
inline unsigned g_group_gen = 1;
struct TgReg { void* p; unsigned gen; };
inline TgReg g_tg[256];
inline int g_ntg = 0;
inline void tg_poison(void* p, size_t n) {
  for (int i = 0; i < g_ntg; i++) {
    if (g_tg[i].p == p) {
      if (g_tg[i].gen != g_group_gen) { g_tg[i].gen = g_group_gen; std::memset(p, 0xFF, n); }
      return;
    }
  }
  if (g_ntg < 256) g_tg[g_ntg++] = TgReg{p, g_group_gen};
  std::memset(p, 0xFF, n);
}

inline std::string g_error;
inline void (*g_entry)() = nullptr;

inline void fiber_main() {
  try {
    g_entry();
  } catch (const std::exception& e) {
    if (g_error.empty()) g_error = e.what();
  }
  cur->state = DONE;
  // returning resumes sched_ctx through uc_link
}

// Run one threadgroup to completion: each round runs every runnable fiber until it
// waits or ends; then SIMD ops are released per SIMD group (over the lanes that reached
// an op of that kind: the active lanes), and a barrier once every live thread waits at one.
inline bool run_group(Group& g, char* stacks, size_t stack_size) {
  grp = &g;
  for (int i = 0; i < g.n; i++) {
    Thread& t = g.threads[i];
    t.state = RUNNABLE;
    t.op_parity = 0;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks + (size_t)i * stack_size;
    t.ctx.uc_stack.ss_size = stack_size;
    t.ctx.uc_link = &sched_ctx;
    makecontext(&t.ctx, (void (*)())fiber_main, 0);
  }
  std::memset(g.mask, 0, sizeof g.mask);
  int nsg = (g.n + 31) / 32;
  for (;;) {
    for (int i = 0; i < g.n; i++) {
      Thread& t = g.threads[i];
      if (t.state != RUNNABLE) continue;
      cur = &t;
      swapcontext(&sched_ctx, &t.ctx);
      if (!g_error.empty()) return false;
    }
    bool released = false, alive = false, all_bar = true;
    for (int s = 0; s < nsg; s++) {
      int lo = 32 * s, hi = lo + 32 < g.n ? lo + 32 : g.n;
      int kind = -1;
      for (int i = lo; i < hi; i++)
        if (g.threads[i].state == WAIT_SIMD) { kind = g.threads[i].simd_kind; break; }
      if (kind < 0) continue;
      uint32_t m = 0; unsigned par = 0;
      for (int i = lo; i < hi; i++) {
        Thread& t = g.threads[i];
        if (t.state == WAIT_SIMD && t.simd_kind == kind) { m |= 1u << (i - lo); par = t.op_parity; }
      }
      for (int i = lo; i < hi; i++) {
        Thread& t = g.threads[i];
        if (t.state == WAIT_SIMD && t.simd_kind == kind) {
          if (t.op_parity != par) { g_error = "SIMD-group lanes out of step (divergent SIMD ops)"; return false; }
          t.state = RUNNABLE;
        }
      }
      g.mask[s][par] = m;
      released = true;
    }
    if (released) continue;
    for (int i = 0; i < g.n; i++) {
      State st = g.threads[i].state;
      if (st != DONE) alive = true;
      if (st != DONE && st != WAIT_BAR) all_bar = false;
    }
    if (!alive) return true;
    if (!all_bar) { g_error = "deadlock: threads wait on different synchronisation points"; return false; }
    for (int i = 0; i < g.n; i++) if (g.threads[i].state == WAIT_BAR) g.threads[i].state = RUNNABLE;
  }
}

// Launch over the grid, threadgroup by threadgroup; edge threadgroups are partial
// (Metal's dispatchThreads with non-uniform threadgroup sizes).
inline int launch_grid(const unsigned* grid, const unsigned* tg, void (*entry)(), char* err, size_t errlen) {
  g_error.clear();
  g_entry = entry;
  unsigned n = tg[0] * tg[1] * tg[2];
  const size_t stack_size = 256 * 1024;
  static char* stacks = nullptr;
  static unsigned stacks_n = 0;
  static Thread* threads = nullptr;
  if (stacks_n < n) {
    delete[] stacks; delete[] threads;
    stacks = new char[(size_t)n * stack_size];
    threads = new Thread[n];
    stacks_n = n;
  }
  static Group g;
  g.threads = threads;
  g.dtptg = vec<uint, 3>(tg[0], tg[1], tg[2]);
  g.grid = vec<uint, 3>(grid[0], grid[1], grid[2]);
  for (int d = 0; d < 3; d++) g.tgpg[d] = (grid[d] + tg[d] - 1) / tg[d];
  for (uint gz = 0; gz < g.tgpg[2]; gz++)
    for (uint gy = 0; gy < g.tgpg[1]; gy++)
      for (uint gx = 0; gx < g.tgpg[0]; gx++) {
        g.tgpig = vec<uint, 3>(gx, gy, gz);
        for (int d = 0; d < 3; d++) {
          uint start = g.tgpig[d] * tg[d];
          g.tptg[d] = grid[d] - start < tg[d] ? grid[d] - start : tg[d];
        }
        g.n = int(g.tptg[0] * g.tptg[1] * g.tptg[2]);
        int i = 0;
        for (uint z = 0; z < g.tptg[2]; z++)
          for (uint y = 0; y < g.tptg[1]; y++)
            for (uint x = 0; x < g.tptg[0]; x++, i++) {
              Thread& t = threads[i];
              t.tpitg = vec<uint, 3>(x, y, z);
              t.tpig = vec<uint, 3>(gx * tg[0] + x, gy * tg[1] + y, gz * tg[2] + z);
              t.tiitg = uint(i);
              t.lane = uint(i % 32);
              t.sg = uint(i / 32);
            }
        g_group_gen++;
        if (!run_group(g, stacks, stack_size)) {
          std::snprintf(err, errlen, "%s (threadgroup %u,%u,%u)", g_error.c_str(), gx, gy, gz);
          return 1;
        }
      }
  return 0;
}

// The values of MLX's attribute parameters, for the current thread.
inline vec<uint, 3> attr3(int which) {
  switch (which) {
    case 0: return cur->tpig;
    case 1: return cur->tpitg;
    case 2: return grp->tgpig;
    case 3: return grp->tgpg;
    case 4: return grp->grid;              // threads_per_grid / grid_size
    case 5: return grp->tptg;              // threads_per_threadgroup
    case 6: return grp->dtptg;             // dispatch_threads_per_threadgroup
    default: return vec<uint, 3>(0u);      // grid_origin
  }
}
inline uint attr1(int which) {
  switch (which) {
    case 0: return cur->tiitg;
    case 1: return cur->lane;
    case 2: return cur->sg;
    case 3: return uint((grp->n + 31) / 32);                     // simdgroups_per_threadgroup
    case 4: return 32u;                                          // threads_per_simdgroup, thread_execution_width
    case 5: return cur->tiitg % 4;                               // thread_index_in_quadgroup
    case 6: return cur->tiitg / 4;                               // quadgroup_index_in_threadgroup
    case 7: return uint((grp->n + 3) / 4);                       // quadgroups_per_threadgroup
    case 8: { uint d = grp->dtptg[0] * grp->dtptg[1] * grp->dtptg[2]; return (d + 31) / 32; }
    case 9: { uint d = grp->dtptg[0] * grp->dtptg[1] * grp->dtptg[2]; return (d + 3) / 4; }
    default: return 0;
  }
}
}  // namespace msl
