# A fleet of pulldeploy nodes: an autoscaling group of Debian/Ubuntu
# instances behind an application load balancer. Each instance bootstraps
# itself with ../user-data.sh (installs the agent from the repository's
# pool, writes its config and keyring, starts it); the load balancer sends
# traffic to the app's port only while the agent's /healthz (port 9100)
# answers 200, i.e. once every configured package has an installed,
# healthy version.
#
# Parse-checked by tests/node_packaging.rs with python-hcl2; not applied
# in CI (no AWS account, no terraform binary). See ../README.md.

terraform {
  required_version = ">= 1.3"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

variable "name" {
  description = "Prefix of every resource name"
  type        = string
  default     = "myapp"
}

variable "ami_id" {
  description = "A Debian 12 or Ubuntu 22.04+ AMI (amd64)"
  type        = string
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "vpc_id" {
  type = string
}

variable "subnet_ids" {
  description = "Subnets of the instances and the load balancer (two zones at least)"
  type        = list(string)
}

variable "repo_bucket" {
  description = "The bucket of the signed apt repository"
  type        = string
  default     = "acme-apt"
}

variable "repo_prefix" {
  description = "The repository's prefix in the bucket, without slashes"
  type        = string
  default     = "repo"
}

variable "fleet_prefix" {
  description = "Key prefix (in repo_bucket) of the fleet's leases, halt markers and reports; must not be inside repo_prefix"
  type        = string
  default     = "fleet"
}

variable "suite" {
  type    = string
  default = "production"
}

variable "packages" {
  description = "What the nodes run; \"pulldeploy\" keeps the agent itself up to date"
  type        = list(string)
  default     = ["myapp", "pulldeploy"]
}

variable "keyring_file" {
  description = "Armored OpenPGP certificate(s) allowed to sign the repository"
  type        = string
  default     = "keyring.asc"
}

variable "agent_deb" {
  description = "The agent's .deb, relative to the repository (the publisher's pool path)"
  type        = string
  default     = "pool/main/p/pulldeploy/pulldeploy_0.1.0_amd64.deb"
}

variable "agent_deb_sha256" {
  description = "SHA-256 of that .deb; user-data refuses anything else (sha256sum FILE)"
  type        = string
}

variable "app_port" {
  description = "Where the app serves traffic"
  type        = number
  default     = 8080
}

variable "app_health_url" {
  description = "The app's own health URL, probed by the agent (empty: none)"
  type        = string
  default     = "http://127.0.0.1:8080/health"
}

locals {
  # The agent's /healthz (health.listen in its config; default 0.0.0.0:9100).
  agent_health_port = 9100
  repo_url          = "s3://${var.repo_bucket}/${var.repo_prefix}"
  # The agent's [lifecycle] hooks (README, "Lifecycle hooks").
  launch_hook    = "${var.name}-launch"
  terminate_hook = "${var.name}-terminate"
}

# ---- what a node may do: read the repository, nothing else --------------------

resource "aws_iam_role" "node" {
  name = "${var.name}-node"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "ec2.amazonaws.com" }
    }]
  })
}

# Same policy as ../iam-policy.json: s3:GetObject under the prefix. No
# s3:ListBucket: the agent never lists, and treats S3's 403 for a missing
# key as "not found" where that is expected.
resource "aws_iam_role_policy" "read_repository" {
  name = "read-apt-repository"
  role = aws_iam_role.node.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid      = "ReadTheRepositoryOnly"
      Effect   = "Allow"
      Action   = "s3:GetObject"
      Resource = "arn:aws:s3:::${var.repo_bucket}/${var.repo_prefix}/*"
    }]
  })
}

# Same as the second statement of ../iam-policy.json: the agent's
# [lifecycle] hooks (README, "Lifecycle hooks") complete the lifecycle
# actions of this group only. No autoscaling:Describe*: those cannot be
# scoped to a group, and the agent does not call them.
resource "aws_iam_role_policy" "lifecycle_hooks" {
  name = "complete-own-lifecycle-actions"
  role = aws_iam_role.node.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid    = "CompleteItsOwnLifecycleActions"
      Effect = "Allow"
      Action = [
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
      ]
      Resource = aws_autoscaling_group.nodes.arn
    }]
  })
}

# Same as the fleet statements of ../iam-policy.json: rollouts (README,
# "Rollouts") coordinate through the fleet prefix, which nodes read and
# write: in-flight leases, halt markers, node reports. The repository
# stays read-only. ListBucket on the fleet prefix only: with it S3 answers
# 404, not 403, for a halt marker that does not exist.
resource "aws_iam_role_policy" "fleet" {
  name = "coordinate-rollouts"
  role = aws_iam_role.node.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "CoordinateThroughTheFleetPrefix"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
        Resource = "arn:aws:s3:::${var.repo_bucket}/${var.fleet_prefix}/*"
      },
      {
        Sid       = "ListTheFleetPrefixOnly"
        Effect    = "Allow"
        Action    = "s3:ListBucket"
        Resource  = "arn:aws:s3:::${var.repo_bucket}"
        Condition = { StringLike = { "s3:prefix" = ["${var.fleet_prefix}/*"] } }
      },
    ]
  })
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}

# ---- network -------------------------------------------------------------------

resource "aws_security_group" "lb" {
  name   = "${var.name}-lb"
  vpc_id = var.vpc_id

  ingress {
    description = "HTTP from anywhere"
    from_port   = 80
    to_port     = 80
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "node" {
  name   = "${var.name}-node"
  vpc_id = var.vpc_id

  ingress {
    description     = "App traffic from the load balancer"
    from_port       = var.app_port
    to_port         = var.app_port
    protocol        = "tcp"
    security_groups = [aws_security_group.lb.id]
  }

  ingress {
    description     = "The agent's /healthz, for the load balancer's health check"
    from_port       = local.agent_health_port
    to_port         = local.agent_health_port
    protocol        = "tcp"
    security_groups = [aws_security_group.lb.id]
  }

  egress {
    description = "S3, IMDS, the distribution's mirror"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

# ---- load balancer ---------------------------------------------------------------

resource "aws_lb" "app" {
  name               = var.name
  load_balancer_type = "application"
  security_groups    = [aws_security_group.lb.id]
  subnets            = var.subnet_ids
}

resource "aws_lb_target_group" "app" {
  name     = var.name
  port     = var.app_port
  protocol = "HTTP"
  vpc_id   = var.vpc_id

  # Traffic goes to the app; readiness is the agent's: /healthz answers 200
  # only when every configured package has a committed (installed and
  # healthy) version and no install is in progress, and 503 while the agent
  # drains before dpkg (health.drain).
  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = local.agent_health_port
    path                = "/healthz"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  deregistration_delay = 30
}

resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.app.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.app.arn
  }
}

# ---- the nodes -------------------------------------------------------------------

resource "aws_launch_template" "node" {
  name_prefix            = "${var.name}-"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  vpc_security_group_ids = [aws_security_group.node.id]

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  # IMDSv2 only: the agent (AWS SDK) and user-data's curl both use tokens.
  # Instance tags in IMDS: the agent's [lifecycle] finds its group in the
  # tag aws:autoscaling:groupName when the config names none.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "enabled"
  }

  # The settings as `export` lines, then ../user-data.sh unchanged (its own
  # "#!/bin/sh" line is then a comment). Values are single-quoted for sh.
  user_data = base64encode(join("\n", [
    "#!/bin/sh",
    "export PULLDEPLOY_REPO_URL='${local.repo_url}'",
    "export PULLDEPLOY_SUITE='${var.suite}'",
    "export PULLDEPLOY_PACKAGES='${join(" ", var.packages)}'",
    "export PULLDEPLOY_KEYRING_B64='${filebase64(var.keyring_file)}'",
    "export PULLDEPLOY_DEB='${var.agent_deb}'",
    "export PULLDEPLOY_DEB_SHA256='${var.agent_deb_sha256}'",
    "export PULLDEPLOY_CHECK_URL='${var.app_health_url}'",
    "export PULLDEPLOY_FLEET_URL='s3://${var.repo_bucket}/${var.fleet_prefix}'",
    "export PULLDEPLOY_LAUNCH_HOOK='${local.launch_hook}'",
    "export PULLDEPLOY_TERMINATE_HOOK='${local.terminate_hook}'",
    file("${path.module}/../user-data.sh"),
  ]))

  tag_specifications {
    resource_type = "instance"
    tags = {
      Name = "${var.name}-node"
    }
  }
}

resource "aws_autoscaling_group" "nodes" {
  name                = var.name
  min_size            = 2
  max_size            = 6
  desired_capacity    = 2
  vpc_zone_identifier = var.subnet_ids
  target_group_arns   = [aws_lb_target_group.app.arn]

  # Replace instances the load balancer finds unhealthy (not only dead
  # ones). The grace period covers boot, user-data and the first install.
  health_check_type         = "ELB"
  health_check_grace_period = 300

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  # A new instance enters service only once the agent has installed the
  # app and found it healthy (it completes this hook with CONTINUE, or
  # ABANDON when the first install fails for good; it sends heartbeats
  # meanwhile). ABANDON on timeout: an instance that never said is not
  # put in service.
  initial_lifecycle_hook {
    name                 = local.launch_hook
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    default_result       = "ABANDON"
    heartbeat_timeout    = 300
  }

  # A terminating instance drains (/healthz 503 for health.drain, no new
  # install) before it completes this hook with CONTINUE.
  initial_lifecycle_hook {
    name                 = local.terminate_hook
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = 120
  }

  # A new launch template version (a new agent .deb, new settings) rolls
  # through the group; app versions do not: the agents pull those.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }
}

output "load_balancer_dns_name" {
  value = aws_lb.app.dns_name
}
