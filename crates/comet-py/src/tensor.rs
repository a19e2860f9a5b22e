//! torch tensors seen from Rust, through Python attribute access only (no
//! libtorch link): `dtype`, `shape`, `is_cuda`, `get_device()`,
//! `is_contiguous()`, `data_ptr()`, `requires_grad` (only with autograd
//! enabled) and, to name a wrong device in an error, `device`. Anything
//! that answers these the way a torch.Tensor does is accepted, which is how
//! the CPU tests exercise the checks without torch.
//!
//! [`check_forward`] turns the five inputs and the output of one call into
//! the [`ForwardArgs`] of comet-sched's device layer, or into a Python
//! exception naming the tensor and what is wrong with it. It runs on every
//! forward, so the reads avoid building Python objects where torch offers
//! an answer without them (see `bench/argument_path.py` for the figures).

use comet_sched::forward::{ForwardArgs, IdType, WeightType};
use pyo3::exceptions::{PyNotImplementedError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyString, PyTuple};

/// What one layer expects of a call's tensors.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub hidden: usize,
    pub ffn: usize,
    pub top_k: usize,
    pub experts_per_rank: usize,
    pub max_tokens: usize,
    /// CUDA ordinal every tensor must live on.
    pub device: usize,
}

/// A tensor's element type: one of the four the layer takes, or the name
/// (without `torch.`) of another, kept for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F32,
    I32,
    I64,
    Other(String),
}

impl Dtype {
    /// The types the layer takes, in the order of [`SEEN`]'s slots.
    const TAKEN: [Dtype; 4] = [Dtype::Bf16, Dtype::F32, Dtype::I32, Dtype::I64];

    fn from_name(name: &str) -> Dtype {
        match name {
            "bfloat16" => Dtype::Bf16,
            "float32" => Dtype::F32,
            "int32" => Dtype::I32,
            "int64" => Dtype::I64,
            other => Dtype::Other(other.to_string()),
        }
    }

    /// torch's name without the `torch.` prefix.
    pub fn name(&self) -> &str {
        match self {
            Dtype::Bf16 => "bfloat16",
            Dtype::F32 => "float32",
            Dtype::I32 => "int32",
            Dtype::I64 => "int64",
            Dtype::Other(n) => n,
        }
    }

    fn slot(&self) -> Option<usize> {
        Dtype::TAKEN.iter().position(|d| d == self)
    }
}

/// The torch dtype objects already recognised, one slot per [`Dtype::TAKEN`].
/// torch's dtypes are process-wide singletons, so after the first sight of
/// each, recognising it is an address comparison instead of building its
/// name as a Python string on every call. Only objects of torch's own dtype
/// class are kept (another object's name could change while it lives), and
/// each is held, so its address cannot pass to another object.
static SEEN: [PyOnceLock<Py<PyAny>>; 4] = [const { PyOnceLock::new() }; 4];

/// The [`Dtype`] a tensor's `dtype` attribute stands for.
fn dtype_of(dtype: &Bound<'_, PyAny>) -> PyResult<Dtype> {
    let py = dtype.py();
    for (slot, seen) in SEEN.iter().enumerate() {
        if seen.get(py).is_some_and(|d| d.as_ptr() == dtype.as_ptr()) {
            return Ok(Dtype::TAKEN[slot].clone());
        }
    }
    let text = dtype.str()?;
    let text = text.to_cow()?;
    let d = Dtype::from_name(text.strip_prefix("torch.").unwrap_or(&text));
    if let Some(slot) = d.slot() {
        if is_torch_dtype(dtype) {
            // Another thread may have filled the slot with the same
            // singleton meanwhile; either way it holds torch's object.
            let _ = SEEN[slot].set(py, dtype.clone().unbind());
        }
    }
    Ok(d)
}

/// Whether `obj`'s class is `torch.dtype` (read only when a dtype is first
/// seen).
fn is_torch_dtype(obj: &Bound<'_, PyAny>) -> bool {
    let ty = obj.get_type();
    let is = |s: PyResult<Bound<'_, PyString>>, want: &str| {
        s.is_ok_and(|s| s.to_cow().is_ok_and(|s| s == want))
    };
    is(ty.module(), "torch") && is(ty.qualname(), "dtype")
}

/// One tensor's properties, read once.
#[derive(Debug, Clone)]
pub struct TensorInfo<'a, 'py> {
    pub name: &'static str,
    obj: &'a Bound<'py, PyAny>,
    pub ptr: u64,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub contiguous: bool,
    /// `is_cuda`, and `get_device()` (torch's ordinal; -1 off CUDA).
    pub on_cuda: bool,
    pub device_index: i64,
    /// Read only with autograd enabled (false otherwise).
    pub requires_grad: bool,
}

fn not_a_tensor(name: &str, obj: &Bound<'_, PyAny>, what: &str) -> PyErr {
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!(
        "comet: {name} must be a torch.Tensor (got {ty}: {what})"
    ))
}

/// `obj.method()`, called without building a bound method; a failure says
/// whether the method is missing or answered something else than `what`.
fn call<'py, T: for<'a> FromPyObject<'a, 'py>>(
    name: &str,
    obj: &Bound<'py, PyAny>,
    method: &Bound<'py, PyString>,
    what: &str,
) -> PyResult<T> {
    let missing = || {
        let m = method.to_string_lossy();
        not_a_tensor(name, obj, &format!("no attribute {:?}", m.as_ref()))
    };
    let got = obj.call_method0(method).map_err(|_| {
        if obj.hasattr(method).unwrap_or(false) {
            not_a_tensor(name, obj, what)
        } else {
            missing()
        }
    })?;
    got.extract().map_err(|_| not_a_tensor(name, obj, what))
}

fn read_shape(
    name: &str,
    obj: &Bound<'_, PyAny>,
    shape: &Bound<'_, PyAny>,
) -> PyResult<Vec<usize>> {
    let bad = || not_a_tensor(name, obj, "shape is not a sequence of integers");
    let dim = |d: &Bound<'_, PyAny>| -> PyResult<usize> {
        let d: i64 = d.extract().map_err(|_| bad())?;
        usize::try_from(d).map_err(|_| not_a_tensor(name, obj, "negative dimension"))
    };
    // torch.Size is a tuple: walked directly, without the generic sequence
    // extraction.
    match shape.cast::<PyTuple>() {
        Ok(t) => t.iter().map(|d| dim(&d)).collect(),
        Err(_) => {
            let dims: Vec<Bound<'_, PyAny>> = shape.extract().map_err(|_| bad())?;
            dims.iter().map(dim).collect()
        }
    }
}

impl<'a, 'py> TensorInfo<'a, 'py> {
    /// Reads `obj` as a tensor named `name`; `requires_grad` only when
    /// `grad_enabled` (nothing else looks at it).
    pub fn read(
        name: &'static str,
        obj: &'a Bound<'py, PyAny>,
        grad_enabled: bool,
    ) -> PyResult<TensorInfo<'a, 'py>> {
        let py = obj.py();
        let attr = |a: &Bound<'py, PyString>| {
            obj.getattr(a).map_err(|_| {
                let a = a.to_string_lossy();
                not_a_tensor(name, obj, &format!("no attribute {:?}", a.as_ref()))
            })
        };
        let dtype = dtype_of(&attr(intern!(py, "dtype"))?)?;
        let shape = read_shape(name, obj, &attr(intern!(py, "shape"))?)?;
        let on_cuda: bool = attr(intern!(py, "is_cuda"))?
            .extract()
            .map_err(|_| not_a_tensor(name, obj, "is_cuda is not a bool"))?;
        let device_index: i64 = call(
            name,
            obj,
            intern!(py, "get_device"),
            "get_device() is not an integer",
        )?;
        let contiguous: bool = call(
            name,
            obj,
            intern!(py, "is_contiguous"),
            "is_contiguous() is not a bool",
        )?;
        let requires_grad = grad_enabled
            && match obj.getattr(intern!(py, "requires_grad")) {
                Ok(v) => v.extract().unwrap_or(false),
                Err(_) => false,
            };
        let ptr: u64 = call(
            name,
            obj,
            intern!(py, "data_ptr"),
            "data_ptr() is not an address",
        )?;
        Ok(TensorInfo {
            name,
            obj,
            ptr,
            dtype,
            shape,
            contiguous,
            on_cuda,
            device_index,
            requires_grad,
        })
    }

    /// The device as torch names it (`cpu`, `cuda:1`), for error messages:
    /// only then is `device` read.
    fn device_name(&self) -> String {
        if self.on_cuda {
            return format!("cuda:{}", self.device_index);
        }
        let Ok(device) = self.obj.getattr("device") else {
            return "not CUDA".into();
        };
        let ty: String = device
            .getattr("type")
            .and_then(|t| t.extract())
            .unwrap_or_else(|_| "not CUDA".into());
        match device
            .getattr("index")
            .and_then(|i| i.extract::<Option<i64>>())
        {
            Ok(Some(i)) => format!("{ty}:{i}"),
            _ => ty,
        }
    }

    /// Device, dtype, shape and layout against what the layer expects.
    fn check(&self, dtypes: &[Dtype], shape: &[Dim], e: &Expect) -> PyResult<()> {
        let name = self.name;
        if !self.on_cuda {
            return Err(PyValueError::new_err(format!(
                "comet: {name} must be a CUDA tensor on cuda:{} (got device {})",
                e.device,
                self.device_name()
            )));
        }
        // A CUDA tensor always has an ordinal: anything else is refused.
        if usize::try_from(self.device_index) != Ok(e.device) {
            return Err(PyValueError::new_err(format!(
                "comet: {name} is on {} but the layer runs on cuda:{}",
                self.device_name(),
                e.device
            )));
        }
        if !dtypes.contains(&self.dtype) {
            let want: Vec<String> = dtypes
                .iter()
                .map(|d| format!("torch.{}", d.name()))
                .collect();
            return Err(PyValueError::new_err(format!(
                "comet: {name} must be {} (got torch.{})",
                want.join(" or "),
                self.dtype.name()
            )));
        }
        let ok = self.shape.len() == shape.len()
            && self.shape.iter().zip(shape).all(|(&got, want)| match want {
                Dim::Is(n) => got == *n,
                Dim::Tokens => true,
            });
        if !ok {
            let want: Vec<String> = shape
                .iter()
                .map(|d| match d {
                    Dim::Is(n) => n.to_string(),
                    Dim::Tokens => "T".into(),
                })
                .collect();
            return Err(PyValueError::new_err(format!(
                "comet: {name} must have shape [{}] (got {:?})",
                want.join(", "),
                self.shape
            )));
        }
        if !self.contiguous {
            return Err(PyValueError::new_err(format!(
                "comet: {name} must be contiguous (call .contiguous() first)"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Dim {
    Is(usize),
    Tokens,
}

/// The five inputs and the output of one call, checked; the token count is
/// x's first dimension and the other per-token tensors must agree with it.
/// With `grad_enabled`, a tensor that requires grad is refused (there is no
/// backward yet). `y` may be omitted (argument checks only).
#[allow(clippy::too_many_arguments)]
pub fn check_forward(
    e: &Expect,
    x: &Bound<'_, PyAny>,
    topk_ids: &Bound<'_, PyAny>,
    topk_weights: &Bound<'_, PyAny>,
    w1: &Bound<'_, PyAny>,
    w2: &Bound<'_, PyAny>,
    y: Option<&Bound<'_, PyAny>>,
    grad_enabled: bool,
) -> PyResult<ForwardArgs> {
    // Every tensor is read before any is checked: a call pays the same
    // reads whatever it gets wrong (bench/argument_path.py relies on it).
    let x = TensorInfo::read("x", x, grad_enabled)?;
    let ids = TensorInfo::read("topk_ids", topk_ids, grad_enabled)?;
    let w = TensorInfo::read("topk_weights", topk_weights, grad_enabled)?;
    let w1 = TensorInfo::read("w1", w1, grad_enabled)?;
    let w2 = TensorInfo::read("w2", w2, grad_enabled)?;
    let y = y
        .map(|y| TensorInfo::read("y", y, grad_enabled))
        .transpose()?;
    if grad_enabled {
        if let Some(t) = [&x, &w, &w1, &w2].into_iter().find(|t| t.requires_grad) {
            return Err(PyNotImplementedError::new_err(format!(
                "comet: backward is not supported yet, and {} requires grad with autograd \
                 enabled; call the layer under torch.no_grad() or torch.inference_mode(), \
                 or pass detached tensors",
                t.name
            )));
        }
    }
    x.check(&[Dtype::Bf16], &[Dim::Tokens, Dim::Is(e.hidden)], e)?;
    let tokens = x.shape[0];
    if tokens > e.max_tokens {
        return Err(PyValueError::new_err(format!(
            "comet: x has {tokens} tokens but the layer was built for max_tokens={}",
            e.max_tokens
        )));
    }
    let per_token = [Dim::Is(tokens), Dim::Is(e.top_k)];
    ids.check(&[Dtype::I32, Dtype::I64], &per_token, e)?;
    w.check(&[Dtype::F32, Dtype::Bf16], &per_token, e)?;
    w1.check(
        &[Dtype::Bf16],
        &[
            Dim::Is(e.experts_per_rank),
            Dim::Is(2 * e.ffn),
            Dim::Is(e.hidden),
        ],
        e,
    )?;
    w2.check(
        &[Dtype::Bf16],
        &[
            Dim::Is(e.experts_per_rank),
            Dim::Is(e.hidden),
            Dim::Is(e.ffn),
        ],
        e,
    )?;
    if let Some(y) = &y {
        y.check(&[Dtype::Bf16], &[Dim::Is(tokens), Dim::Is(e.hidden)], e)?;
        if tokens > 0 && y.ptr == x.ptr {
            return Err(PyValueError::new_err(
                "comet: y must not be x (the layer reads x while writing y)",
            ));
        }
    }
    for t in [&x, &w1, &w2].into_iter().chain(y.as_ref()) {
        if t.ptr % 16 != 0 {
            return Err(PyValueError::new_err(format!(
                "comet: {} must start at a 16-byte aligned address (got {:#x}); \
                 a fresh or .clone()d tensor is",
                t.name, t.ptr
            )));
        }
    }
    Ok(ForwardArgs {
        tokens,
        x: x.ptr,
        topk_ids: ids.ptr,
        ids: if ids.dtype == Dtype::I64 {
            IdType::I64
        } else {
            IdType::I32
        },
        topk_weights: w.ptr,
        weights: if w.dtype == Dtype::Bf16 {
            WeightType::Bf16
        } else {
            WeightType::F32
        },
        w1: w1.ptr,
        w2: w2.ptr,
        y: y.map_or(0, |y| y.ptr),
    })
}
