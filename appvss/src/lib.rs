//! appvss: what applications link to hold a vssd freeze (see DESIGN.md). The protocol and the
//! clients arrive with issue 3; this crate exists so the workspace has its final shape.
#![forbid(unsafe_code)]
