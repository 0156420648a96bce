// pybind11 module dsjax._io: the batch-read engine and CRC-32 for dsjax.io.
//
// Every entry point checks its arguments before touching memory (sizes agree, no negative
// offsets or lengths, every destination range inside the output buffer) and releases the GIL for
// the I/O, so Python threads (grain's) keep running while a batch is read.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "crc32.h"
#include "engine.h"
#include "uring.h"

namespace py = pybind11;
using dsjax_io::Engine;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// A contiguous uint8 buffer (numpy array, bytearray, memoryview...), never copied:
// a silent conversion would read into a temporary the caller never sees.
uint8_t* Bytes(py::buffer& buf, bool writable, int64_t* size, const char* name) {
  py::buffer_info info = buf.request(writable);
  if (info.itemsize != 1 || (info.format != "B" && info.format != "b" && info.format != "c")) {
    throw py::value_error(std::string(name) + ": expected a uint8 buffer, got format '" + info.format + "'");
  }
  int64_t expect = 1;
  for (ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] != 1 && info.strides[d] != expect) {
      throw py::value_error(std::string(name) + ": expected a C-contiguous buffer");
    }
    expect *= info.shape[d];
  }
  *size = static_cast<int64_t>(info.size);
  return static_cast<uint8_t*>(info.ptr);
}

void CheckSameLength(int64_t n, int64_t m, const char* name) {
  if (m != n) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(n) + " entries (one per request), got " +
                          std::to_string(m));
  }
}

void CheckRanges(const int64_t* offsets, const int64_t* lengths, const int64_t* dsts, int64_t n, int64_t out_size) {
  for (int64_t i = 0; i < n; ++i) {
    if (offsets[i] < 0 || lengths[i] < 0 || dsts[i] < 0) {
      throw py::value_error("request " + std::to_string(i) + ": offset, length and dst must be >= 0, got " +
                            std::to_string(offsets[i]) + ", " + std::to_string(lengths[i]) + ", " +
                            std::to_string(dsts[i]));
    }
    if (lengths[i] > out_size || dsts[i] > out_size - lengths[i]) {
      throw py::value_error("request " + std::to_string(i) + ": dst " + std::to_string(dsts[i]) + " + length " +
                            std::to_string(lengths[i]) + " exceeds the output buffer of " + std::to_string(out_size) +
                            " bytes");
    }
  }
}

// The first mmap failure of the engine, as a RuntimeWarning naming the file and errno (once per
// engine; Engine.stats()['map_failed'] counts them all): a file that cannot be mapped is read
// with pread, correct but slower, and that must not go unnoticed.
void WarnMapFailure(Engine& e) {
  std::string path;
  int err = 0;
  if (!e.TakeMapFailure(&path, &err)) return;
  const std::string msg = "dsjax.io: could not mmap " + (path.empty() ? std::string("a file") : path) + " (errno " +
                          std::to_string(err) + ", " + std::strerror(err) +
                          "); its records are read with pread instead (correct, slower). Further mmap failures of "
                          "this engine are only counted, in its stats()['map_failed'].";
  if (PyErr_WarnEx(PyExc_RuntimeWarning, msg.c_str(), 1) != 0) throw py::error_already_set();
}

}  // namespace

PYBIND11_MODULE(_io, m) {
  m.doc() = "dsjax native batch-read engine (mmap fast path / pread thread pool / io_uring, optional O_DIRECT) and CRC-32";

  m.def("live_mappings", &dsjax_io::LiveMappings, "File mappings held by all engines of this process.");
  m.def("default_max_mapped_files", &dsjax_io::DefaultMaxMappedFiles,
        "Default cap on mapped files (per engine and per process): half of /proc/sys/vm/max_map_count.");
  m.def("io_uring_available", [] { return dsjax_io::Uring::Create(8) != nullptr; },
        "True when an io_uring ring can be created and read through in this process.");

  m.def(
      "split",
      [](py::array out, CArray<int64_t> bounds) {
        // The per-record list of FFRecordReader.read: one view per record, made here because a
        // Python-level slice per record costs as much as reading a 4 KiB record from the mapping.
        if (!out.dtype().is(py::dtype::of<uint8_t>()) || out.ndim() != 1 || !(out.flags() & py::array::c_style)) {
          throw py::value_error("out: expected a contiguous 1-D uint8 array, got dtype " +
                                std::string(py::str(out.dtype())) + " with " + std::to_string(out.ndim()) +
                                " dimensions");
        }
        const int64_t n = static_cast<int64_t>(bounds.size()) - 1;
        const int64_t* b = bounds.data();
        for (int64_t k = 0; k < n; ++k) {
          if (b[k] < 0 || b[k] > b[k + 1] || b[k + 1] > out.size()) {
            throw py::value_error("bounds: expected non-decreasing offsets within [0, " + std::to_string(out.size()) +
                                  "], got bounds[" + std::to_string(k) + ":" + std::to_string(k + 2) + "] = " +
                                  std::to_string(b[k]) + ", " + std::to_string(b[k + 1]));
          }
        }
        auto& api = py::detail::npy_api::get();
        const int flags = out.writeable() ? py::detail::npy_api::NPY_ARRAY_WRITEABLE_ : 0;
        auto* base = static_cast<uint8_t*>(const_cast<void*>(out.data()));
        py::list result(std::max<int64_t>(n, 0));
        for (int64_t k = 0; k < n; ++k) {
          Py_intptr_t dim = static_cast<Py_intptr_t>(b[k + 1] - b[k]);
          Py_intptr_t stride = 1;
          PyObject* descr = api.PyArray_DescrFromType_(py::detail::npy_api::NPY_UBYTE_);  // new reference
          PyObject* view = api.PyArray_NewFromDescr_(api.PyArray_Type_, descr, 1, &dim, &stride, base + b[k], flags, nullptr);
          if (view == nullptr) throw py::error_already_set();
          if (api.PyArray_SetBaseObject_(view, out.inc_ref().ptr()) != 0) {  // steals the reference
            Py_DECREF(view);
            throw py::error_already_set();
          }
          PyList_SET_ITEM(result.ptr(), k, view);  // steals view
        }
        return result;
      },
      py::arg("out"), py::arg("bounds"),
      "[out[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)], built in C: views sharing out's memory.");

  m.def("crc32", [](py::buffer data, uint32_t value) {
          int64_t size = 0;
          const uint8_t* p = Bytes(data, false, &size, "data");
          const size_t n = static_cast<size_t>(size);
          py::gil_scoped_release release;
          return dsjax_io::Crc32(value, p, n);
        },
        py::arg("data"), py::arg("value") = 0,
        "zlib-compatible CRC-32 of a contiguous buffer, continuing from `value`.");

  m.def("crc32_portable", [](py::buffer data, uint32_t value) {
          int64_t size = 0;
          const uint8_t* p = Bytes(data, false, &size, "data");
          py::gil_scoped_release release;
          return dsjax_io::Crc32Portable(value, p, static_cast<size_t>(size));
        },
        py::arg("data"), py::arg("value") = 0,
        "The built-in slicing-by-8 CRC-32 (used when zlib is absent at build time), for testing.");
  m.def("crc32_pclmul", [](py::buffer data, uint32_t value) -> py::object {
#if defined(DSJAX_IO_HAVE_PCLMUL)
          if (!dsjax_io::HavePclmul()) return py::none();
          int64_t size = 0;
          const uint8_t* p = Bytes(data, false, &size, "data");
          py::gil_scoped_release release;
          return py::int_(dsjax_io::Crc32Pclmul(value, p, static_cast<size_t>(size)));
#else
          return py::none();
#endif
        },
        py::arg("data"), py::arg("value") = 0,
        "The PCLMULQDQ CRC-32, or None where the CPU or build lacks it, for testing.");
  m.attr("crc32_uses_zlib") = py::bool_(
#if defined(DSJAX_IO_HAVE_ZLIB)
      true
#else
      false
#endif
  );

  py::class_<Engine>(m, "Engine")
      .def(py::init<int, const std::string&, unsigned, int64_t, int64_t>(), py::arg("threads"),
           py::arg("kind") = "auto", py::arg("queue_depth") = 256, py::arg("align") = 0,
           py::arg("max_mapped_files") = 0,
           "max_mapped_files: kind 'mmap': most files mapped at once, least recently used unmapped\n"
           "beyond it (0: default_max_mapped_files()). Raises RuntimeError when the reader threads\n"
           "cannot be started (after joining those that were).")
      .def_property_readonly("max_mapped_files", &Engine::max_maps, "The cap on mapped files (kind 'mmap'), else 0.")
      .def_property_readonly("populate_mode", &Engine::populate_mode,
                             "'madvise' (MADV_POPULATE_READ) or 'touch' (its fallback on kernels < 5.14).")
      .def("_force_touch_populate", &Engine::ForceTouchPopulate, "Tests: use the fallback page-table population.")
      .def(
          "_hold_maps_lock",
          [](Engine& e, double seconds) {
            py::gil_scoped_release release;
            return e.HoldMapsLockForTest(seconds);
          },
          py::arg("seconds"),
          "Tests: a native thread holds the mappings' lock exclusively for `seconds`; returns once held.")
      .def_property_readonly("kind", &Engine::kind, "'mmap', 'pread' or 'io_uring': the backend in use.")
      .def_property_readonly("threads", &Engine::threads)
      .def_property_readonly("align", &Engine::align)
      .def(
          "read",
          [](Engine& e, CArray<int32_t> fds, CArray<int64_t> offsets, CArray<int64_t> lengths, CArray<int64_t> dsts,
             py::buffer out, py::object crc) -> py::object {
            const int64_t n = fds.size();
            CheckSameLength(n, offsets.size(), "offsets");
            CheckSameLength(n, lengths.size(), "lengths");
            CheckSameLength(n, dsts.size(), "dsts");
            int64_t out_size = 0;
            uint8_t* out_ptr = Bytes(out, true, &out_size, "out");
            CheckRanges(offsets.data(), lengths.data(), dsts.data(), n, out_size);
            uint32_t* crc_ptr = nullptr;
            if (!crc.is_none()) {
              // Written in place, so it must be exactly the caller's array: no silent conversion.
              auto arr = py::array::ensure(crc);
              if (!arr || !arr.dtype().is(py::dtype::of<uint32_t>()) || arr.ndim() != 1 ||
                  !(arr.flags() & py::array::c_style) || !arr.writeable()) {
                throw py::value_error("crc: expected a writable contiguous 1-D uint32 numpy array, got " +
                                      std::string(py::str(py::type::of(crc))) +
                                      (arr ? " of dtype " + std::string(py::str(arr.dtype())) : std::string()));
              }
              CheckSameLength(n, arr.size(), "crc");
              crc_ptr = static_cast<uint32_t*>(arr.mutable_data());
            }
            std::vector<dsjax_io::Request> reqs(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) {
              reqs[i] = dsjax_io::Request{fds.data()[i], offsets.data()[i], lengths.data()[i], dsts.data()[i]};
            }
            dsjax_io::ReadFailure failure;
            bool ok;
            {
              py::gil_scoped_release release;
              ok = e.Read(reqs.data(), n, out_ptr, &failure, crc_ptr);
            }
            WarnMapFailure(e);  // a file mapped again on demand may have failed
            if (ok) return py::none();
            return py::make_tuple(failure.index, failure.err, failure.got);
          },
          py::arg("fds"), py::arg("offsets"), py::arg("lengths"), py::arg("dsts"), py::arg("out"),
          py::arg("crc") = py::none(),
          "Reads request i (fds[i], offsets[i], lengths[i]) into out[dsts[i]:dsts[i] + lengths[i]].\n"
          "Returns None, or (request index, errno, bytes read) for the lowest failing request;\n"
          "errno 0 means end of file before `length` bytes. crc: None or uint32[n] that receives\n"
          "the CRC-32 of every request's bytes (valid only when the read succeeded).")
      .def(
          "stats",
          [](const Engine& e) {
            const Engine::Stats st = e.stats();
            py::dict d;
            d["mapped"] = st.mapped;
            d["deferred"] = st.deferred;
            d["faulted"] = st.faulted;
            d["unmapped"] = st.unmapped;
            d["map_failed"] = st.map_failed;
            d["evicted"] = st.evicted;
            d["remapped"] = st.remapped;
            d["mapped_files"] = st.mapped_files;
            d["populated"] = st.populated;
            return d;
          },
          "Counters of kind 'mmap'. Records: 'mapped' (copied from the file mappings), 'deferred'\n"
          "(read by pread: not in the page cache), 'unmapped' (read by pread: no usable mapping of\n"
          "their file: mmap failed, more files in one batch than max_mapped_files, or a forked\n"
          "child), 'faulted' (mapped copies that hit SIGBUS). Files: 'map_failed' (mmap failures),\n"
          "'evicted' (least recently used mappings dropped at the cap or on ENOMEM), 'remapped'\n"
          "(evicted files mapped again on use), 'mapped_files' (now). 'populated': pages whose\n"
          "page-table entries the background thread filled.")
      .def(
          "map_file",
          [](Engine& e, int fd, const std::string& path) {
            bool ok;
            {
              py::gil_scoped_release release;  // mmap/madvise, and waiting for batches in flight
              ok = e.MapFile(fd, path);
            }
            WarnMapFailure(e);
            return ok;
          },
          py::arg("fd"), py::arg("path") = "",
          "kind 'mmap': registers fd (read-only mappings) for the page-cache fast path and maps it\n"
          "now; False when it is not mapped now: at the cap (mapped on first use, evicting the least\n"
          "recently used) or mmap failed (it is then read with pread; a RuntimeWarning names `path`\n"
          "and the errno, once per engine). Call unmap_file(fd) before closing fd.")
      .def(
          "unmap_file",
          [](Engine& e, int fd) {
            py::gil_scoped_release release;  // waits for batches in flight, which run without the GIL
            e.UnmapFile(fd);
          },
          py::arg("fd"), "Drops the mapping of fd (if any); waits for batches in flight.")
      .def(
          "crc32_batch",
          [](Engine& e, py::buffer out, CArray<int64_t> dsts, CArray<int64_t> lengths) {
            const int64_t n = dsts.size();
            CheckSameLength(n, lengths.size(), "lengths");
            int64_t out_size = 0;
            uint8_t* out_ptr = Bytes(out, true, &out_size, "out");
            std::vector<int64_t> zeros(static_cast<size_t>(n), 0);
            CheckRanges(zeros.data(), lengths.data(), dsts.data(), n, out_size);
            py::array_t<uint32_t> crc(n);
            uint32_t* crc_ptr = crc.mutable_data();
            {
              py::gil_scoped_release release;
              e.Crc32Batch(out_ptr, dsts.data(), lengths.data(), n, crc_ptr);
            }
            return crc;
          },
          py::arg("out"), py::arg("dsts"), py::arg("lengths"),
          "uint32[n]: CRC-32 of out[dsts[i]:dsts[i] + lengths[i]], computed in parallel.");
}
