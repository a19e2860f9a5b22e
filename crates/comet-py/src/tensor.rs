//! torch tensors seen from Rust, through Python attribute access only (no
//! libtorch link): `data_ptr()`, `dtype`, `shape`, `is_contiguous()`,
//! `device` and `requires_grad`. Anything that answers these the way a
//! torch.Tensor does is accepted, which is how the CPU tests exercise the
//! checks without torch.
//!
//! [`check_forward`] turns the five inputs and the output of one call into
//! the [`ForwardArgs`] of comet-sched's device layer, or into a Python
//! exception naming the tensor and what is wrong with it.

use comet_sched::forward::{ForwardArgs, IdType, WeightType};
use pyo3::exceptions::{PyNotImplementedError, PyTypeError, PyValueError};
use pyo3::prelude::*;

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

/// One tensor's properties, read once.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: &'static str,
    pub ptr: u64,
    /// The dtype's name without the `torch.` prefix (`bfloat16`, `int64`).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub contiguous: bool,
    pub device_type: String,
    pub device_index: Option<usize>,
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

impl TensorInfo {
    /// Reads `obj` as a tensor named `name`.
    pub fn read(name: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<TensorInfo> {
        let attr = |a: &str| {
            obj.getattr(a)
                .map_err(|_| not_a_tensor(name, obj, &format!("no attribute {a:?}")))
        };
        let dtype_obj = attr("dtype")?;
        let dtype = dtype_obj.str()?.to_string();
        let dtype = dtype.strip_prefix("torch.").unwrap_or(&dtype).to_string();
        let shape_obj = attr("shape")?;
        let shape: Vec<i64> = shape_obj
            .extract()
            .map_err(|_| not_a_tensor(name, obj, "shape is not a sequence of integers"))?;
        let shape = shape
            .into_iter()
            .map(|d| usize::try_from(d).map_err(|_| not_a_tensor(name, obj, "negative dimension")))
            .collect::<PyResult<Vec<usize>>>()?;
        let device = attr("device")?;
        let device_type: String = device
            .getattr("type")
            .and_then(|t| t.extract())
            .map_err(|_| not_a_tensor(name, obj, "device has no type"))?;
        let device_index: Option<i64> = device
            .getattr("index")
            .and_then(|i| i.extract())
            .map_err(|_| not_a_tensor(name, obj, "device has no index"))?;
        let contiguous: bool = attr("is_contiguous")?
            .call0()
            .and_then(|c| c.extract())
            .map_err(|_| not_a_tensor(name, obj, "is_contiguous() is not a bool"))?;
        let requires_grad: bool = match obj.getattr("requires_grad") {
            Ok(v) => v.extract().unwrap_or(false),
            Err(_) => false,
        };
        let ptr: u64 = attr("data_ptr")?
            .call0()
            .and_then(|p| p.extract())
            .map_err(|_| not_a_tensor(name, obj, "data_ptr() is not an address"))?;
        Ok(TensorInfo {
            name,
            ptr,
            dtype,
            shape,
            contiguous,
            device_type,
            device_index: device_index.and_then(|i| usize::try_from(i).ok()),
            requires_grad,
        })
    }

    fn device_name(&self) -> String {
        match self.device_index {
            Some(i) => format!("{}:{i}", self.device_type),
            None => self.device_type.clone(),
        }
    }

    /// Device, dtype, shape and layout against what the layer expects.
    fn check(&self, dtypes: &[&str], shape: &[Dim], e: &Expect) -> PyResult<()> {
        let name = self.name;
        if self.device_type != "cuda" {
            return Err(PyValueError::new_err(format!(
                "comet: {name} must be a CUDA tensor on cuda:{} (got device {})",
                e.device,
                self.device_name()
            )));
        }
        if self.device_index.unwrap_or(e.device) != e.device {
            return Err(PyValueError::new_err(format!(
                "comet: {name} is on {} but the layer runs on cuda:{}",
                self.device_name(),
                e.device
            )));
        }
        if !dtypes.contains(&self.dtype.as_str()) {
            let want: Vec<String> = dtypes.iter().map(|d| format!("torch.{d}")).collect();
            return Err(PyValueError::new_err(format!(
                "comet: {name} must be {} (got torch.{})",
                want.join(" or "),
                self.dtype
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
    let x = TensorInfo::read("x", x)?;
    let ids = TensorInfo::read("topk_ids", topk_ids)?;
    let w = TensorInfo::read("topk_weights", topk_weights)?;
    let w1 = TensorInfo::read("w1", w1)?;
    let w2 = TensorInfo::read("w2", w2)?;
    let y = y.map(|y| TensorInfo::read("y", y)).transpose()?;
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
    x.check(&["bfloat16"], &[Dim::Tokens, Dim::Is(e.hidden)], e)?;
    let tokens = x.shape[0];
    if tokens > e.max_tokens {
        return Err(PyValueError::new_err(format!(
            "comet: x has {tokens} tokens but the layer was built for max_tokens={}",
            e.max_tokens
        )));
    }
    let per_token = [Dim::Is(tokens), Dim::Is(e.top_k)];
    ids.check(&["int32", "int64"], &per_token, e)?;
    w.check(&["float32", "bfloat16"], &per_token, e)?;
    w1.check(
        &["bfloat16"],
        &[
            Dim::Is(e.experts_per_rank),
            Dim::Is(2 * e.ffn),
            Dim::Is(e.hidden),
        ],
        e,
    )?;
    w2.check(
        &["bfloat16"],
        &[
            Dim::Is(e.experts_per_rank),
            Dim::Is(e.hidden),
            Dim::Is(e.ffn),
        ],
        e,
    )?;
    if let Some(y) = &y {
        y.check(&["bfloat16"], &[Dim::Is(tokens), Dim::Is(e.hidden)], e)?;
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
        ids: if ids.dtype == "int64" {
            IdType::I64
        } else {
            IdType::I32
        },
        topk_weights: w.ptr,
        weights: if w.dtype == "bfloat16" {
            WeightType::Bf16
        } else {
            WeightType::F32
        },
        w1: w1.ptr,
        w2: w2.ptr,
        y: y.map_or(0, |y| y.ptr),
    })
}
